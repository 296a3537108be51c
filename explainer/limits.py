"""Every resource limit in one place. Raise one by assigning to it, e.g.
``explainer.limits.MAX_IMAGE_PIXELS = 200_000_000``, or by the environment variable named beside it."""
from __future__ import annotations

import os


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return default


#: Largest ONNX file or byte string accepted (protobuf itself stops at 2 GiB).
MAX_MODEL_BYTES = _env_int("ONNX_EXPLAINER_MAX_MODEL_BYTES", 1 << 31)
#: Largest total size of weights and constant tensors a graph may declare, checked before any session
#: allocates (a 1 KB file can declare a ConstantOfShape of terabytes).
MAX_TENSOR_BYTES = _env_int("ONNX_EXPLAINER_MAX_TENSOR_BYTES", 4 << 30)
#: Largest image (width x height) decoded; checked from the file header before decoding.
MAX_IMAGE_PIXELS = _env_int("ONNX_EXPLAINER_MAX_IMAGE_PIXELS", 64_000_000)
#: Largest image file read.
MAX_IMAGE_BYTES = _env_int("ONNX_EXPLAINER_MAX_IMAGE_BYTES", 256 << 20)
#: Largest download accepted from the registry.
MAX_DOWNLOAD_BYTES = _env_int("ONNX_EXPLAINER_MAX_DOWNLOAD_BYTES", 1 << 31)
