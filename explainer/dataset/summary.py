"""The summary of a dataset job: per method, how many rows, images and failures, and each metric's
mean ± standard deviation; written as summary.json and summary.md beside the rows."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def summarise(store) -> dict:
    rows = store.read_rows(columns=["image_id", "method", "deletion_auc", "insertion_auc", "seconds"]).to_pydict()
    errors = store.read_errors().to_pydict()
    methods = list(dict.fromkeys(rows["method"]))
    out = {"images": len(set(rows["image_id"]) | set(errors["image_id"])), "rows": len(rows["method"]),
           "failed_images": len({i for i, m in zip(errors["image_id"], errors["method"]) if m is None}),
           "errors_by_type": {t: errors["error_type"].count(t) for t in sorted(set(errors["error_type"]))},
           "methods": {}}
    for name in methods:
        mine = [i for i, m in enumerate(rows["method"]) if m == name]
        entry = {"rows": len(mine), "images": len({rows["image_id"][i] for i in mine}),
                 "failures": sum(1 for m in errors["method"] if m == name),
                 "seconds_mean": float(np.mean([rows["seconds"][i] for i in mine]))}
        for metric in ("deletion_auc", "insertion_auc"):
            values = np.array([rows[metric][i] for i in mine if rows[metric][i] is not None], np.float64)
            if len(values):
                entry[metric] = {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                                 "n": int(len(values))}
        out["methods"][name] = entry
    return out


def markdown(summary: dict) -> str:
    lines = [f"{summary['images']} images, {summary['rows']} rows, {summary['failed_images']} images failed"
             + (f" ({', '.join(f'{k}: {v}' for k, v in summary['errors_by_type'].items())})"
                if summary["errors_by_type"] else ""), "",
             "| method | rows | images | failures | deletion AUC (lower is better) | insertion AUC (higher is better) "
             "| s per map |", "|---|---|---|---|---|---|---|"]
    for name, e in summary["methods"].items():
        cells = [f"{e[m]['mean']:.3f} ± {e[m]['sd']:.3f}" if m in e else "" for m in ("deletion_auc", "insertion_auc")]
        lines.append(f"| {name} | {e['rows']} | {e['images']} | {e['failures']} | {cells[0]} | {cells[1]} | "
                     f"{e['seconds_mean']:.2f} |")
    return "\n".join(lines) + "\n"


def write(store) -> dict:
    summary = summarise(store)
    out = Path(store.out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(markdown(summary))
    return summary
