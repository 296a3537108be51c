"""The HTML pages the library writes (the report of ``explain``, the walkthrough's index): one look,
plain HTML and CSS that open from disk with no server and no network."""
from __future__ import annotations

import html

STYLE = """body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
header{background:#1d2330;color:#fff;padding:20px 32px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#c4cad6}
main{max-width:1280px;margin:0 auto;padding:24px 32px}
section{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.08);padding:16px 20px;margin:0 0 20px}
h2{font-size:17px;margin:0 0 10px}h3{font-size:15px;margin:0 0 6px}
table{border-collapse:collapse}th,td{padding:4px 12px;border-bottom:1px solid #e3e6eb;text-align:left;vertical-align:top}
th{background:#eef2f7}td.num{text-align:right;font-variant-numeric:tabular-nums}
.bar{display:inline-block;height:10px;background:#3b7dd8;border-radius:2px;vertical-align:middle}
.row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
figure{margin:0}figure img{max-width:100%;height:auto;border:1px solid #e3e6eb;border-radius:4px}
figcaption{color:#4a5262;font-size:14px;margin-top:6px}
.row figure{width:380px}
code{font-size:13px;background:#f0f2f5;padding:1px 4px;border-radius:3px}"""

#: after load, the page counts its images that decoded (naturalWidth > 0): the browser test reads it
IMAGES_LOADED = """<script>window.addEventListener("load", () => { const imgs = [...document.images];
document.body.dataset.imagesLoaded = imgs.filter(i => i.naturalWidth > 0).length + "/" + imgs.length; });</script>"""


def page(title: str, subtitle: str, body: str) -> str:
    """A whole page: ``body`` is HTML (sections); title and subtitle are text."""
    esc = html.escape
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<meta name='viewport' content='width=device-width,initial-scale=1'><style>{STYLE}</style></head>"
            f"<body><header><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></header><main>{body}</main>"
            f"{IMAGES_LOADED}</body></html>\n")


def score_table(predictions, caption: str = "") -> str:
    """Rank, class, probability and a bar for each prediction (``net.top_k``)."""
    esc = html.escape
    rows = "".join(f"<tr><td>{r}</td><td>{esc(p.label)}</td><td class='num'>{p.score:.4f}</td>"
                   f"<td><span class='bar' style='width:{max(1, round(160 * p.score))}px'></span></td></tr>"
                   for r, p in enumerate(predictions, 1))
    head = f"<caption style='text-align:left'>{esc(caption)}</caption>" if caption else ""
    return f"<table>{head}<tr><th>#</th><th>class</th><th>probability</th><th></th></tr>{rows}</table>"
