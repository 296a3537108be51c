"""Where a dataset's images come from: a folder (recursive), a text or CSV list of paths, or a
Parquet/CSV table with an image-path column. Each image gets a stable id (its path relative to the
source's folder), the key a resumed run skips by. Paths are streamed, never all held with their
pixels."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Iterator, NamedTuple

from ..errors import InvalidParameterError

#: the file suffixes a folder's images are found by (decoding still checks the format)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm"})
#: column names taken as the image path in a table, in this order
PATH_COLUMNS = ("path", "image", "image_path", "file", "filename")


class ImageRef(NamedTuple):
    id: str    # stable across runs: the path relative to the source's folder (or as listed)
    path: str  # where to read it


class Source:
    """An image source; iterate it for ``ImageRef``s (sorted, so runs and resumes see one order)."""

    def __init__(self, source, path_column: str | None = None):
        self.spec = source
        self.path = Path(source)
        self.path_column = path_column
        if not self.path.exists():
            raise InvalidParameterError(f"explain_dataset: source {str(source)!r} does not exist; give a folder, a "
                                        ".txt/.csv list of image paths or a .parquet/.csv table with an image-path column.")
        suffix = self.path.suffix.lower()
        if not self.path.is_dir() and suffix not in (".txt", ".csv", ".parquet", ".pq"):
            raise InvalidParameterError(f"explain_dataset: source {str(source)!r} is neither a folder nor a .txt, "
                                        ".csv or .parquet file.")

    def __iter__(self) -> Iterator[ImageRef]:
        if self.path.is_dir():
            yield from self._folder()
        elif self.path.suffix.lower() == ".txt":
            yield from self._listed(line.strip() for line in self.path.read_text().splitlines())
        elif self.path.suffix.lower() == ".csv":
            yield from self._csv()
        else:
            yield from self._parquet()

    def count(self) -> int:
        return sum(1 for _ in self)

    # ----------------------------------------------------------------------------------------------
    def _folder(self) -> Iterator[ImageRef]:
        root = self.path
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(files):
                if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                    full = Path(folder) / name
                    yield ImageRef(full.relative_to(root).as_posix(), str(full))

    def _listed(self, paths) -> Iterator[ImageRef]:
        base = self.path.parent
        for p in paths:
            if not p or p.startswith("#"):
                continue
            full = Path(p) if Path(p).is_absolute() else base / p
            yield ImageRef(p, str(full))

    def _column(self, names) -> str:
        if self.path_column is not None:
            if self.path_column not in names:
                raise InvalidParameterError(f"explain_dataset: {str(self.path)!r} has no column {self.path_column!r}; "
                                            f"its columns are {list(names)}.")
            return self.path_column
        for c in PATH_COLUMNS:
            if c in names:
                return c
        raise InvalidParameterError(f"explain_dataset: {str(self.path)!r} has no image-path column (one of "
                                    f"{', '.join(PATH_COLUMNS)}); its columns are {list(names)}; pass path_column=.")

    def _csv(self) -> Iterator[ImageRef]:
        with open(self.path, newline="") as f:
            first = f.readline()
            f.seek(0)
            header = next(csv.reader([first]), [])
            if len(header) == 1 and Path(header[0]).suffix.lower() in IMAGE_SUFFIXES:  # a plain list
                yield from self._listed(row[0] for row in csv.reader(f) if row)
                return
            reader = csv.DictReader(f)
            column = self._column(reader.fieldnames or [])
            yield from self._listed(row[column] for row in reader)

    def _parquet(self) -> Iterator[ImageRef]:
        import pyarrow.parquet as pq

        table = pq.ParquetFile(self.path)
        column = self._column(table.schema_arrow.names)
        for batch in table.iter_batches(columns=[column], batch_size=4096):
            yield from self._listed(str(v) for v in batch.column(0).to_pylist())
