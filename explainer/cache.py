"""Where built and downloaded models and measured settings are kept: ``$XDG_CACHE_HOME/onnx-explainer``
(``~/.cache/onnx-explainer`` by default; ``ONNX_EXPLAINER_CACHE`` overrides both)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    override = os.environ.get("ONNX_EXPLAINER_CACHE")
    if override:
        root = Path(override)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = Path(base) / "onnx-explainer"
    root.mkdir(parents=True, exist_ok=True)
    return root


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` so that readers see either the old file or the complete new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(name: str) -> dict:
    path = cache_dir() / name
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def update_json(name: str, key: str, value) -> None:
    data = read_json(name)
    data[key] = value
    atomic_write(cache_dir() / name, json.dumps(data, indent=1, sort_keys=True).encode())
