"""Where built and downloaded models and measured settings are kept: ``$XDG_CACHE_HOME/onnx-explainer``
(``~/.cache/onnx-explainer`` by default; ``ONNX_EXPLAINER_CACHE`` overrides both)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .errors import CacheError

CACHE_ENV = "ONNX_EXPLAINER_CACHE"


def cache_dir() -> Path:
    override = os.environ.get(CACHE_ENV)
    if override:
        root = Path(override)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = Path(base) / "onnx-explainer"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(root, exc) from None
    return root


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` so that readers see either the old file or the complete new one, never a part."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise write_error(path, exc) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_error(path: Path, exc: OSError) -> CacheError:
    """The one error for a cache file or folder that cannot be written, naming the two ways out."""
    return CacheError(f"cannot write {str(path)!r}: {exc.strerror or exc}. Free space there, or point the "
                      f"environment variable {CACHE_ENV} at a writable folder with room.")


def read_json(name: str) -> dict:
    try:
        value = json.loads((cache_dir() / name).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def update_json(name: str, key: str, value) -> None:
    data = read_json(name)
    data[key] = value
    atomic_write(cache_dir() / name, json.dumps(data, indent=1, sort_keys=True).encode())
