"""``explain``: run several methods on one image and write a PNG per method and label plus an
``index.html`` (image, top-k table, maps side by side per label, parameters and timings)."""
from __future__ import annotations

import html
import json
import time
from pathlib import Path

import numpy as np

from .errors import InvalidParameterError
from .evaluate import DELETION_BASELINES
from .io import to_pixels
from .validation import check_choice

DEFAULT_METHODS = ("gradcam", "occlusion", "lime", "gradient", "guided_backprop")


def run_method(net, name: str, image, labels, verbose: bool = True, **options):
    """(maps, the options it ran with) for a registered method: seeded methods get random_state=0
    unless given, so that a report is reproducible; the options recorded are the resolved ones."""
    from .methods.registry import get_method

    method = get_method(name, "explain")
    if method.seeded:
        options.setdefault("random_state", 0)
    if "verbose" in method.options:
        options["verbose"] = verbose
    resolved = method.validate(net, options, "explain")
    maps = method(net, image, labels, **options)
    params = {k: _plain(v) for k, v in resolved.items() if k != "verbose"}
    if "feature_layer" in params and params["feature_layer"] is None:
        from .methods.gradcam import gradcam_layers

        params["feature_layer"] = gradcam_layers(net).feature
    return maps, params


def _plain(value):
    """A JSON-writable form of an option value."""
    if isinstance(value, np.ndarray):
        return value.tolist() if value.size <= 16 else f"array {value.shape}"
    if isinstance(value, tuple):
        return list(value)
    return value


def resolve_labels(net, image, spec: str) -> list[int]:
    """'top3' (any k) or comma-separated class names / indices → class indices."""
    spec = spec.strip()
    if spec.startswith("top") and spec[3:].isdigit():
        k = int(spec[3:])
        return [p.index for p in net.top_k(image, k)]
    out = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        out.append(net.class_index(int(part) if part.isdigit() else part, "labels"))
    if not out:
        raise InvalidParameterError(f"labels must be 'topK' or class names/indices; got {spec!r}.")
    return out


def explain(net, image, *, methods=DEFAULT_METHODS, labels="top3", out_dir="explanations", evaluate: bool = True,
            deletion_baseline: str = "zero", options=None, verbose: bool = True) -> Path:
    """Compute the maps and write the report; returns the path of index.html. ``methods``: names of
    the method registry (``explainer.list_methods()``); ``options``: {method: {option: value}};
    ``deletion_baseline``: what the deletion curves fill removed pixels with (see ``explainer.evaluate``)."""
    from PIL import Image

    from .methods.registry import get_method
    from .viz import overlay

    if isinstance(methods, str) or not methods:
        raise InvalidParameterError(f"explain: methods must be a non-empty list of method names; got {methods!r}.")
    methods = [get_method(m, "explain").name for m in methods]  # unknown names fail before any work
    options = dict(options or {})
    for name in list(options):
        canonical = get_method(name, "explain").name
        options[canonical] = options.pop(name)
        get_method(canonical).validate(net, options[canonical], "explain")
    check_choice("explain", "deletion_baseline", deletion_baseline, DELETION_BASELINES)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pixels = to_pixels(image)
    rgb = np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels
    Image.fromarray(rgb.astype(np.uint8)).save(out / "image.png")
    image = pixels / 255.0  # as the methods take it (floats in 0..1), computed once
    indices = resolve_labels(net, image, labels) if isinstance(labels, str) else \
        net.class_indices(labels, "labels")[0]
    probs = net.predict(image)
    top = net.top_k(image, 5)
    results = []
    for name in methods:
        start = time.perf_counter()
        maps, params = run_method(net, name, image, indices, verbose, **dict(options.get(name, {})))
        seconds = time.perf_counter() - start
        maps = np.asarray(maps).reshape(len(indices), *pixels.shape[:2])
        files, metrics = [], []
        for k, idx in enumerate(indices):
            file = f"{name}_{idx}.png"
            Image.fromarray(overlay(image, maps[k])).save(out / file)
            files.append(file)
            if evaluate:
                metrics.append(_metrics(net, image, maps[k], idx, out, f"{name}_{idx}", deletion_baseline))
        results.append(dict(method=name, params=params, seconds=seconds, files=files, metrics=metrics))
    page = _html(net, top, probs, indices, results)
    (out / "index.html").write_text(page, encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(dict(
        model=net.name, labels=[net.class_names[i] for i in indices],
        methods=[{k: v for k, v in r.items() if k != "files"} for r in results]), indent=1, default=float))
    return out / "index.html"


def _metrics(net, image, saliency, label, out, stem, deletion_baseline):
    """Deletion/insertion AUC and a curve PNG."""
    from .evaluate import deletion, insertion

    d = deletion(net, image, saliency, label, baseline=deletion_baseline, verbose=False)
    i = insertion(net, image, saliency, label, verbose=False)
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.2, 2.4))
    ax.plot(d.fractions, d.scores, label=f"deletion ({deletion_baseline}) AUC {d.auc:.3f}")
    ax.plot(i.fractions, i.scores, label=f"insertion AUC {i.auc:.3f}")
    ax.set_xlabel("fraction of pixels")
    ax.set_ylabel("probability")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{stem}_curves.png", dpi=80)
    plt.close(fig)
    return {"deletion_auc": d.auc, "deletion_baseline": deletion_baseline, "insertion_auc": i.auc,
            "curves": f"{stem}_curves.png"}


def _html(net, top, probs, indices, results) -> str:
    esc = html.escape
    rows = "".join(f"<tr><td>{r + 1}</td><td>{esc(p.label)}</td><td>{p.score:.4f}</td></tr>" for r, p in enumerate(top))
    sections = []
    for k, idx in enumerate(indices):
        cells = []
        for r in results:
            m = r["metrics"][k] if r["metrics"] else {}
            extra = ""
            if m:
                extra = (f"<br>deletion ({m['deletion_baseline']}) AUC {m['deletion_auc']:.3f} · "
                         f"insertion AUC {m['insertion_auc']:.3f}"
                         f"<br><img src=\"{esc(m['curves'])}\" alt=\"curves\" width=\"240\">")
            cells.append(f"<figure><img src=\"{esc(r['files'][k])}\" alt=\"{esc(r['method'])}\" width=\"300\">"
                         f"<figcaption><b>{esc(r['method'])}</b> · {r['seconds']:.2f} s{extra}</figcaption></figure>")
        sections.append(f"<h2>{esc(net.class_names[idx])} (p = {probs[idx]:.4f})</h2><div class=\"row\">{''.join(cells)}</div>")
    params = "".join(f"<li><b>{esc(r['method'])}</b>: {esc(json.dumps(r['params']))} — {r['seconds']:.2f} s</li>" for r in results)
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>onnx-explainer: {esc(net.name)}</title>
<style>body{{font-family:sans-serif;margin:24px}} .row{{display:flex;flex-wrap:wrap;gap:12px}}
figure{{margin:0}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:3px 8px}}</style></head>
<body><h1>Why did {esc(net.name)} say that?</h1>
<div class="row"><img src="image.png" alt="image" width="300">
<table><tr><th>#</th><th>class</th><th>probability</th></tr>{rows}</table></div>
{''.join(sections)}
<h2>Parameters and timings</h2><ul>{params}</ul>
<script>window.addEventListener("load", () => {{ const imgs = [...document.images];
document.body.dataset.imagesLoaded = imgs.filter(i => i.naturalWidth > 0).length + "/" + imgs.length; }});</script>
</body></html>
"""
