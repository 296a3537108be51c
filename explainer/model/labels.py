"""Class names: given explicitly (list, .txt one per line, .json list or {index: name}), read from the
graph's ``metadata_props``, or the built-in ImageNet-1k names for 1000 (or 1001, with background)
classes; otherwise ``class_0 .. class_{K-1}``."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import InvalidParameterError, InvalidParameterTypeError

METADATA_KEYS = ("onnx_explainer.labels", "labels", "class_names", "classes", "names")


@lru_cache(maxsize=1)
def imagenet_labels() -> tuple[str, ...]:
    text = (Path(__file__).with_name("imagenet_classes.txt")).read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line)


def _parse_text(text: str, where: str) -> list[str]:
    text = text.strip()
    if text.startswith("[") or text.startswith("{"):
        try:
            value = json.loads(text)
        except (ValueError, RecursionError) as exc:  # RecursionError: arrays nested thousands deep
            raise InvalidParameterError(f"labels in {where} are not valid JSON ({exc}).") from None
        return _from_json(value, where)
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    if len(lines) == 1 and "," in lines[0]:
        lines = [p.strip() for p in lines[0].split(",")]
    return lines


def _from_json(value, where: str) -> list[str]:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    if isinstance(value, dict):
        try:
            items = sorted((int(k), v) for k, v in value.items())
        except (TypeError, ValueError):
            raise InvalidParameterError(f"labels in {where}: dict keys must be class indices.") from None
        if [i for i, _ in items] != list(range(len(items))) or not all(isinstance(v, str) for _, v in items):
            raise InvalidParameterError(f"labels in {where}: indices must be 0..K-1 with string names.")
        return [v for _, v in items]
    raise InvalidParameterError(f"labels in {where} must be a list of names or {{index: name}}.")


def resolve(labels, metadata: dict, num_classes: int | None) -> list[str] | None:
    """``labels=`` argument and metadata → list of names (None if the class count is not yet known)."""
    if labels is None:
        names = None
        for key in METADATA_KEYS:
            if key in metadata:
                names = _parse_text(metadata[key], f"metadata_props[{key!r}]")
                break
        if names is None:
            if num_classes is None:
                return None
            if num_classes == 1000:
                return list(imagenet_labels())
            if num_classes == 1001:
                return ["background", *imagenet_labels()]
            return [f"class_{i}" for i in range(num_classes)]
    elif isinstance(labels, (str, os.PathLike)):
        path = Path(labels)
        if not path.is_file():
            raise InvalidParameterError(f"load: labels file {str(path)!r} does not exist.")
        names = _parse_text(path.read_text(encoding="utf-8"), str(path))
    elif isinstance(labels, dict):
        names = _from_json(labels, "the labels dict")
    elif isinstance(labels, (list, tuple)) and all(isinstance(v, str) for v in labels):
        names = list(labels)
    else:
        raise InvalidParameterTypeError(
            "load: labels must be None, a list of names, a {index: name} dict or a .txt/.json path; "
            f"got {type(labels).__name__}.")
    if num_classes is not None and len(names) != num_classes:
        raise InvalidParameterError(
            f"load: {len(names)} labels were given but the model has {num_classes} classes.")
    if len(set(names)) != len(names):
        seen, dup = set(), []
        for n in names:
            if n in seen:
                dup.append(n)
            seen.add(n)
        raise InvalidParameterError(f"load: labels must be unique; repeated: {dup[:5]}.")
    return names


# which classes to explain ------------------------------------------------------------------------
_TOP = re.compile(r"^top(\d+)$", re.IGNORECASE)


def top_indices(probabilities: np.ndarray, k: int) -> list[int]:
    """The ``k`` most probable classes of one (K,) row, most probable first (ties in class order)."""
    return [int(i) for i in np.argsort(-probabilities, kind="stable")[:k]]


@dataclass(frozen=True)
class LabelSpec:
    """Which classes to explain: the top ``top`` predictions (known once the image is classified) or
    the given classes (indices or names). The one parser of "top3" / "tabby,5" for every way in: the
    report, the CLI, the service and the dataset jobs."""

    top: int | None = None
    classes: tuple = ()

    @classmethod
    def parse(cls, value, where: str = "labels") -> "LabelSpec":
        """None or '' (the top class), "topK" (K ≥ 1, any case), comma-separated class indices or names,
        or a list of them."""
        if value is None or (isinstance(value, str) and not value.strip()):
            return cls(top=1)
        if isinstance(value, str):
            match = _TOP.match(value.strip())
            if match:
                k = int(match.group(1))
                if k < 1:
                    raise InvalidParameterError(f"{where}: top{k} asks for no class; use top1 or more.")
                return cls(top=k)
            value = [int(v) if v.isdigit() else v for v in (v.strip() for v in value.split(",")) if v]
        if isinstance(value, (int, np.integer, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)) or not value:
            raise InvalidParameterTypeError(f"{where}: 'topK', or a list of class indices or names is needed; "
                                            f"got {value!r}.")
        for label in value:
            if isinstance(label, bool) or not isinstance(label, (int, np.integer, str)):
                raise InvalidParameterTypeError(f"{where}: class indices (integers) or names (text) are "
                                                f"needed; got {label!r}.")
        return cls(classes=tuple(dict.fromkeys(int(v) if isinstance(v, np.integer) else v for v in value)))

    def indices(self, class_index, probabilities: np.ndarray | None = None, where: str = "labels") -> list[int]:
        """Class indices: the top classes of ``probabilities`` (one image's (K,) row), or the given
        classes through ``class_index(label, where)`` (``Classifier.class_index``), each once."""
        if self.top is not None:
            return top_indices(probabilities, min(self.top, len(probabilities)))
        return list(dict.fromkeys(class_index(c, where) for c in self.classes))
