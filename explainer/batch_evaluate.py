"""``explainer evaluate DIR``: deletion and insertion AUC of several methods for every image of a
folder. Each finished image appends its rows to a CSV at once, so an interrupted run loses nothing and
a rerun skips what is done; a summary (mean ± sd per method) closes the run."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .errors import InvalidParameterError
from .evaluate import DELETION_BASELINES
from .io import ALLOWED_FORMATS
from .validation import check_choice

FIELDS = ["image", "method", "label", "deletion_baseline", "deletion_auc", "insertion_auc"]
SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm"}


#: a baseline beside the registered methods: a random map (what chance scores)
RANDOM = "random"


def _map(net, method, image, label):
    if method == RANDOM:
        from .io import to_pixels

        return np.random.default_rng(0).random(to_pixels(image).shape[:2]).astype(np.float32)
    from .report import run_method

    return run_method(net, method, image, label, verbose=False)[0]


def _canonical(method: str, strict: bool = True) -> str:
    from .methods.registry import get_method

    try:
        return method if method == RANDOM else get_method(method, "evaluate").name
    except InvalidParameterError:
        if strict:
            raise
        return method


def evaluate_folder(net, folder, *, methods=("gradcam", "occlusion", "lime"), csv_path=None, steps=50,
                    deletion_baseline="zero", verbose=True) -> str:
    """Append a CSV row per image and method (skipping those already there for this deletion
    baseline), then return the summary table."""
    from . import progress

    from .evaluate import deletion, insertion

    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidParameterError(f"evaluate: {str(folder)!r} is not a folder.")
    check_choice("evaluate", "deletion_baseline", deletion_baseline, DELETION_BASELINES)
    methods = [_canonical(m) for m in methods]  # every name validated before any work
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES and p.is_file())
    if not images:
        raise InvalidParameterError(f"evaluate: no images ({', '.join(ALLOWED_FORMATS)}) in {str(folder)!r}.")
    csv_path = Path(csv_path) if csv_path else folder / "explainer_evaluation.csv"
    done = set()
    if csv_path.is_file():
        with open(csv_path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames and reader.fieldnames != FIELDS:
                raise InvalidParameterError(
                    f"evaluate: {str(csv_path)!r} has columns {reader.fieldnames}, not {FIELDS}; pass another "
                    "--csv path (or move the old file) to start a new evaluation.")
            # names written before the registry ("guided-backprop") count under today's names
            done = {(r["image"], _canonical(r["method"], strict=False), r["deletion_baseline"]) for r in reader}
    new_file = not csv_path.is_file()
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new_file:
            writer.writeheader()
            f.flush()
        for path in progress.bar(images, desc="images", unit="img", verbose=verbose, leave=True):
            todo = [m for m in methods if (path.name, m, deletion_baseline) not in done]
            if not todo:
                continue
            label = net.top_k(path, 1)[0]
            rows = []
            for method in todo:
                saliency = _map(net, method, path, label.index)
                removed = deletion(net, path, saliency, label.index, steps=steps, baseline=deletion_baseline,
                                   verbose=False)
                inserted = insertion(net, path, saliency, label.index, steps=steps, verbose=False)
                rows.append(dict(image=path.name, method=method, label=label.label,
                                 deletion_baseline=deletion_baseline, deletion_auc=f"{removed.auc:.6f}",
                                 insertion_auc=f"{inserted.auc:.6f}"))
            writer.writerows(rows)  # one image at a time: an interruption keeps every finished image
            f.flush()
    return summarise(csv_path)


def summarise(csv_path) -> str:
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    lines = ["| method | deletion baseline | images | deletion AUC (lower is better) | "
             "insertion AUC (higher is better) |", "|---|---|---|---|---|"]
    for method, baseline in dict.fromkeys((r["method"], r["deletion_baseline"]) for r in rows):
        mine = [r for r in rows if r["method"] == method and r["deletion_baseline"] == baseline]
        d = np.array([float(r["deletion_auc"]) for r in mine])
        i = np.array([float(r["insertion_auc"]) for r in mine])
        lines.append(f"| {method} | {baseline} | {len(d)} | {d.mean():.3f} ± {d.std(ddof=1) if len(d) > 1 else 0:.3f}"
                     f" | {i.mean():.3f} ± {i.std(ddof=1) if len(i) > 1 else 0:.3f} |")
    return "\n".join(lines)
