"""A dataset job's output folder: Parquet parts of rows and of errors, written whole images at a
time, each part atomically (written beside, then renamed), so an interrupted run leaves a readable
dataset and a resumed run finds exactly the images it finished.

    OUT/rows/part-*.parquet     one row per (image, label, method)   pandas.read_parquet("OUT/rows")
    OUT/errors/part-*.parquet   one row per failed image or method   pandas.read_parquet("OUT/errors")
    OUT/summary.json, summary.md
"""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import numpy as np

from ..errors import InvalidParameterError

#: in ``Store.done``: the image failed as a whole (it could not be read), so no method is left to do
ALL = "*"


def row_schema():
    import pyarrow as pa

    return pa.schema([
        ("image_id", pa.string()), ("path", pa.string()), ("height", pa.int32()), ("width", pa.int32()),
        ("label", pa.int32()), ("label_name", pa.string()), ("score", pa.float32()),
        ("top_k_indices", pa.list_(pa.int32())), ("top_k_labels", pa.list_(pa.string())),
        ("top_k_scores", pa.list_(pa.float32())),
        ("method", pa.string()), ("options", pa.string()),
        ("map", pa.list_(pa.float16())), ("map_height", pa.int32()), ("map_width", pa.int32()),
        ("deletion_auc", pa.float64()), ("insertion_auc", pa.float64()),
        ("seconds", pa.float64()), ("metric_seconds", pa.float64()), ("worker", pa.string()),
    ])


def error_schema():
    import pyarrow as pa

    return pa.schema([("image_id", pa.string()), ("path", pa.string()), ("method", pa.string()),
                      ("error_type", pa.string()), ("message", pa.string())])


def rows_table(rows: list[dict]):
    """Rows (maps as (H, W) float16 arrays) → a pyarrow Table of ``row_schema``."""
    import pyarrow as pa

    out = []
    for r in rows:
        r = dict(r)
        m = np.asarray(r.pop("map"), np.float16)
        r.update(map=m.ravel(), map_height=m.shape[0], map_width=m.shape[1])
        out.append(r)
    schema = row_schema()
    columns = {f.name: [r[f.name] for r in out] for f in schema}
    maps = columns.pop("map")
    offsets = np.concatenate([[0], np.cumsum([len(m) for m in maps])]).astype(np.int32)
    flat = np.concatenate(maps) if maps else np.zeros(0, np.float16)
    arrays = [pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.float16())) if f.name == "map"
              else pa.array(columns[f.name], f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def map_of(row) -> np.ndarray:
    """A row's map as its (H, W) float16 array (rows from pandas or pyarrow)."""
    return np.asarray(row["map"], np.float16).reshape(int(row["map_height"]), int(row["map_width"]))


def read_parts(out, kind: str, columns=None):
    """The whole parts of ``kind`` ("rows" or "errors") in a job's folder as one pyarrow Table, read
    without touching the folder (a job may be writing it: parts appear whole, by rename)."""
    import pyarrow.parquet as pq

    folder = Path(out) / kind
    if not folder.is_dir():
        raise InvalidParameterError(f"read_{kind}: {str(out)!r} is not a dataset job's folder (it has no {kind}/); give "
                                    "the out= folder of explain_dataset or explainer batch --out.")
    parts = sorted(folder.glob("part-*.parquet"))
    empty = row_schema() if kind == "rows" else error_schema()
    return pq.read_table([str(p) for p in parts], columns=columns) if parts else empty.empty_table()


class Store:
    """A job's folder opened for writing: made if missing, half-written parts of an interrupted run
    removed, new parts added whole."""

    def __init__(self, out, resume: bool = True, part_rows: int = 256):
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise InvalidParameterError(f"explain_dataset: out {str(self.out)!r} exists and is not a folder.")
        existing = self.out.is_dir() and any((self.out / d).glob("part-*.parquet") for d in ("rows", "errors"))
        if existing and not resume:
            raise InvalidParameterError(f"explain_dataset: {str(self.out)!r} already holds results; pass resume=True "
                                        "to add to them, or another out folder.")
        for d in ("rows", "errors"):
            (self.out / d).mkdir(parents=True, exist_ok=True)
            for stale in (self.out / d).glob(".part-*.tmp"):  # a part an interruption left half written
                stale.unlink()
        self.part_rows = part_rows
        self.run = time.strftime("%Y%m%d%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self._held: dict[str, list] = {"rows": [], "errors": []}
        self._count = 0
        self._parts = 0

    def done(self) -> dict[str, set]:
        """{image id: the methods it has rows or errors of}; an image that failed as a whole (an error
        with no method) maps to ``ALL``. A resumed run does only what is missing."""
        import pyarrow.parquet as pq

        found: dict[str, set] = {}
        for d in ("rows", "errors"):
            for part in sorted((self.out / d).glob("part-*.parquet")):
                table = pq.read_table(part, columns=["image_id", "method"]).to_pydict()
                for image_id, method in zip(table["image_id"], table["method"]):
                    found.setdefault(image_id, set()).add(ALL if method is None else method)
        return found

    def add(self, rows: list[dict], errors: list[dict]) -> None:
        """One image's rows and errors (kept together: a part holds whole images)."""
        import pyarrow as pa

        self.add_table(rows_table(rows) if rows else None,
                       pa.Table.from_pylist(errors, schema=error_schema()) if errors else None)

    def add_table(self, rows, errors) -> None:
        """Whole images' rows and errors as pyarrow Tables (or None), written once enough are held."""
        for kind, table in (("rows", rows), ("errors", errors)):
            if table is not None and table.num_rows:
                self._held[kind].append(table)
                self._count += table.num_rows
        if self._count >= self.part_rows:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa

        for kind, tables in self._held.items():
            if tables:
                self._write(kind, pa.concat_tables(tables))
        self._held, self._count = {"rows": [], "errors": []}, 0

    def _write(self, kind: str, table) -> None:
        import pyarrow.parquet as pq

        name = f"part-{self.run}-{self._parts:06d}.parquet"
        self._parts += 1
        tmp = self.out / kind / f".{name}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, self.out / kind / name)  # atomic: readers see whole parts only

    def read_rows(self, columns=None):
        return read_parts(self.out, "rows", columns)

    def read_errors(self):
        return read_parts(self.out, "errors")
