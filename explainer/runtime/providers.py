"""Choosing onnxruntime execution providers: CUDA only where its provider really loads.

onnxruntime-gpu lists CUDAExecutionProvider as available even on machines without a GPU or CUDA
libraries, and then logs a long error when a session falls back to the CPU. We probe once, quietly,
with a one-node model, and remember the answer.
"""
from __future__ import annotations

import glob
import platform
from functools import lru_cache

from ..errors import DeviceError, InvalidParameterError

DEVICES = ("auto", "cpu", "cuda")
CPU = ["CPUExecutionProvider"]
CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]
#: options per provider: onnxruntime's CUDA provider rounds float32 matmuls and convolutions to TF32 by
#: default (10-bit mantissa), which moves a deep model's scores by about 1e-2 and would make the torch
#: module (float32-exact, ``float32_exact``) fail its check against onnxruntime; explanations are float32
PROVIDER_OPTIONS = {"CUDAExecutionProvider": {"use_tf32": "0"}}


def provider_options(providers) -> list[dict]:
    return [dict(PROVIDER_OPTIONS.get(p, {})) for p in providers]


def quiet_session(model_bytes: bytes, providers, optimise: bool = True, disabled=()):
    """A session without onnxruntime's log lines; ``optimise``: its default graph optimisations (else
    none), less the optimisers ``disabled``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    if not optimise:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ort.set_default_logger_severity(4)
    try:
        extra = {"disabled_optimizers": list(disabled)} if disabled else {}
        return ort.InferenceSession(model_bytes, options, providers=providers,
                                    provider_options=provider_options(providers), **extra)
    finally:
        ort.set_default_logger_severity(2)


@lru_cache(maxsize=1)
def cuda_available() -> bool:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    if platform.system() == "Linux" and not glob.glob("/dev/nvidia[0-9]*"):
        return False  # no GPU device node: the provider cannot load, skip the noisy attempt
    import onnx

    if hasattr(ort, "preload_dlls"):
        try:  # CUDA/cuDNN libraries shipped as pip packages (e.g. with torch)
            ort.preload_dlls()
        except Exception:
            pass
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    graph = onnx.helper.make_graph([node], "probe", [onnx.helper.make_tensor_value_info("x", 1, [1])],
                                   [onnx.helper.make_tensor_value_info("y", 1, [1])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    try:
        session = quiet_session(model.SerializeToString(), CUDA)
    except Exception:
        return False
    return "CUDAExecutionProvider" in session.get_providers()


def resolve_device(device: str) -> tuple[str, list[str]]:
    """``device`` argument → (resolved device name, provider list)."""
    if device not in DEVICES:
        raise InvalidParameterError(f"load: device must be one of {DEVICES}; got {device!r}.")
    if device == "cpu":
        return "cpu", CPU
    if cuda_available():
        return "cuda", CUDA
    if device == "cuda":
        raise DeviceError(
            "device='cuda' was requested but onnxruntime's CUDA execution provider cannot load here "
            "(no GPU, or onnxruntime-gpu without matching CUDA/cuDNN libraries). Use device='cpu' or "
            "'auto', or install onnxruntime-gpu with its CUDA dependencies.")
    return "cpu", CPU
