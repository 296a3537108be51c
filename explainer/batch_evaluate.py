"""``explainer evaluate DIR``: deletion and insertion AUC of several methods for every image of a
folder, on the dataset machinery (``explain_dataset``: validated plan, typed error rows, resume). The
rows are kept as a Parquet dataset beside the CSV (one per deletion baseline) and exported to the CSV
as they are; an interrupted run exports what it finished, and a rerun does only what is missing. A
summary (mean ± sd per method) closes the run. ``random`` (a registered method) is the chance level."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import InvalidParameterError
from .evaluate import DELETION_BASELINES
from .validation import check_choice

if TYPE_CHECKING:
    from .runtime.classifier import Classifier

FIELDS = ["image", "method", "label", "deletion_baseline", "deletion_auc", "insertion_auc"]


def _canonical(method: str, strict: bool = True) -> str:
    from .methods.registry import get_method

    try:
        return get_method(method, "evaluate").name
    except InvalidParameterError:
        if strict:
            raise
        return method


def _csv_rows(csv_path: Path) -> list[dict]:
    if not csv_path.is_file():
        return []
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames and reader.fieldnames != FIELDS:
            raise InvalidParameterError(
                f"evaluate: {str(csv_path)!r} has columns {reader.fieldnames}, not {FIELDS}; pass another "
                "--csv path (or move the old file) to start a new evaluation.")
        return list(reader)


def dataset_folder(csv_path: Path, deletion_baseline: str) -> Path:
    """Where the Parquet rows of one deletion baseline are kept, beside the CSV."""
    return csv_path.with_name(f"{csv_path.stem}-{deletion_baseline}")


def evaluate_folder(net: Classifier, folder, *, methods=("gradcam", "occlusion", "lime"), csv_path=None, steps=50,
                    deletion_baseline="zero", verbose=True) -> str:
    """Evaluate every image of ``folder`` (recursively) with each method on its top-1 class, append the
    new rows to the CSV, and return the summary table."""
    from .dataset import explain_dataset

    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidParameterError(f"evaluate: {str(folder)!r} is not a folder.")
    check_choice("evaluate", "deletion_baseline", deletion_baseline, DELETION_BASELINES)
    methods = [_canonical(m) for m in methods]  # every name validated before any work
    csv_path = Path(csv_path) if csv_path else folder / "explainer_evaluation.csv"
    _csv_rows(csv_path)  # a CSV of another format is refused before any work
    out = dataset_folder(csv_path, deletion_baseline)
    try:
        explain_dataset(folder, net, methods=methods, labels="top1", metrics=("deletion", "insertion"), out=out,
                        steps=steps, deletion_baseline=deletion_baseline, verbose=verbose)
    finally:  # an interruption exports what finished
        _export(out, csv_path, deletion_baseline)
    return summarise(csv_path)


def _export(out: Path, csv_path: Path, deletion_baseline: str) -> None:
    """Append the rows of the dataset folder that the CSV lacks."""
    from .dataset import read_rows

    if not out.is_dir():
        return
    # names written before the registry ("guided-backprop") count under today's names
    have = {(r["image"], _canonical(r["method"], strict=False), r["deletion_baseline"]) for r in _csv_rows(csv_path)}
    rows = read_rows(out, columns=["image_id", "method", "label_name", "deletion_auc", "insertion_auc"])
    new = [dict(image=r.image_id, method=r.method, label=r.label_name, deletion_baseline=deletion_baseline,
                deletion_auc=f"{r.deletion_auc:.6f}", insertion_auc=f"{r.insertion_auc:.6f}")
           for r in rows.itertuples() if (r.image_id, r.method, deletion_baseline) not in have]
    first = not csv_path.is_file()
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if first:
            writer.writeheader()
        writer.writerows(new)


def summarise(csv_path) -> str:
    rows = _csv_rows(Path(csv_path))
    lines = ["| method | deletion baseline | images | deletion AUC (lower is better) | "
             "insertion AUC (higher is better) |", "|---|---|---|---|---|"]
    for method, baseline in dict.fromkeys((r["method"], r["deletion_baseline"]) for r in rows):
        mine = [r for r in rows if r["method"] == method and r["deletion_baseline"] == baseline]
        d = np.array([float(r["deletion_auc"]) for r in mine])
        i = np.array([float(r["insertion_auc"]) for r in mine])
        lines.append(f"| {method} | {baseline} | {len(d)} | {d.mean():.3f} ± {d.std(ddof=1) if len(d) > 1 else 0:.3f}"
                     f" | {i.mean():.3f} ± {i.std(ddof=1) if len(i) > 1 else 0:.3f} |")
    return "\n".join(lines)
