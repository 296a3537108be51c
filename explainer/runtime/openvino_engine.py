"""Forward passes in OpenVINO: the ``OrtEngine`` contract (sessions per set of requested outputs, runs
checked by the memory guard, batching, the measured best batch size, parallel streams) on OpenVINO's
CPU plugin, compiling the same normalised ONNX graph (``Classifier.model``).

``precision``: ``"f32"`` (the default) sets ``INFERENCE_PRECISION_HINT=f32``, which OpenVINO otherwise
lowers to bf16 on CPUs with bf16 instructions; its probabilities match onnxruntime's to about 1e-6.
``"bf16"`` / ``"f16"`` are opt-in: faster where the CPU has the instructions (f16 needs AMX-FP16 or
AVX512-FP16; without them the engine refuses it), with rounded scores. Measured by
``benchmarks/openvino.py`` (2026-12-06, AMD EPYC with avx512_bf16, chelsea): bf16 moves the
probabilities by at most 0.0050 (EfficientNet-Lite0; top-1 0.7712 → 0.7662) and 0.0008 (resnet18);
its maps correlate with f32's on the same masks / windows at r = 0.9998 / 1.0000 (RISE) and 0.9952 /
0.9989 (occlusion), at 1.4-2.2x the f32 speed on that machine. f32's probabilities are within 7e-7
of onnxruntime's there (tests/test_openvino.py bounds them by 1e-5, maps by 1e-4).

Parallel streams: a one-core session of onnxruntime is, here, one model compiled with ``NUM_STREAMS``
equal to the stream count and one thread per stream; each calling thread owns an infer request of it
(an OpenVINO infer request serves one caller at a time), so that ``stream_probabilities`` and the
incremental occlusion run their batches in parallel as on onnxruntime.

The engine knows nothing about explanation methods: it maps an input batch to named output arrays.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from functools import lru_cache
from typing import Sequence

import numpy as np
import onnx

from ..errors import DeviceError, ExplainerError, InvalidParameterError, UnsupportedModelError
from .budget import allocation_error, is_allocation_failure
from .ort_engine import OrtEngine

ENGINES = ("onnxruntime", "openvino", "auto")
PRECISIONS = ("f32", "bf16", "f16")
#: OpenVINO's name of each precision, and the capability its CPU plugin reports for it
_HINTS = {"f32": "f32", "bf16": "bf16", "f16": "f16"}
_CAPABILITIES = {"f32": "FP32", "bf16": "BF16", "f16": "FP16"}
INSTALL = "pip install -e '.[openvino]'  (or: pip install 'onnx-explainer[openvino]')"


def check_choice(engine: str, precision: str) -> None:
    if engine not in ENGINES:
        raise InvalidParameterError(f"load: engine must be one of {ENGINES}; got {engine!r}.")
    if precision not in PRECISIONS:
        raise InvalidParameterError(f"load: precision must be one of {PRECISIONS}; got {precision!r}.")
    if precision != "f32" and engine != "openvino":
        raise InvalidParameterError(
            f"load: precision={precision!r} runs on OpenVINO only (engine='openvino'); onnxruntime and "
            "engine='auto' run float32.")


def available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


@lru_cache(maxsize=1)
def core():
    """The process's OpenVINO Core (thread-safe; one is enough)."""
    try:
        import openvino as ov
    except ImportError as exc:
        raise DeviceError(f"engine='openvino' needs the openvino package ({exc}): {INSTALL}") from None
    return ov.Core()


def version() -> str:
    import openvino as ov

    return ov.__version__.split("-")[0]


class _Session:
    """A compiled model behind onnxruntime's ``session.run(names, {input: x})``: each calling thread
    runs its own infer request; outputs are copied out of the request's buffers."""

    def __init__(self, compiled, input_name: str, providers: list[str]):
        self.compiled = compiled
        self._input = compiled.input(input_name)
        self._outputs = {}
        for port in compiled.outputs:
            for name in port.get_names():
                self._outputs.setdefault(name, port)
        self._all = [p.get_any_name() for p in compiled.outputs]
        self._local = threading.local()
        self._providers = providers

    def run(self, names, feed: dict) -> list[np.ndarray]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        (x,) = feed.values()
        result = request.infer({self._input: np.ascontiguousarray(x)}, share_inputs=True, share_outputs=False)
        return [np.asarray(result[self._outputs[n]]) for n in (self._all if names is None else names)]

    def get_providers(self) -> list[str]:
        return list(self._providers)


class OpenVinoEngine(OrtEngine):
    """``OrtEngine``'s contract on OpenVINO (CPU): ``session(outputs, single_thread)``, ``run``,
    ``run_batched``, ``best_batch_size`` (cached per model, precision and machine),
    ``parallel_streams`` and ``guard`` as there."""

    engine = "openvino"

    def __init__(self, model: onnx.ModelProto, input_name: str, model_key: str, precision: str = "f32",
                 device: str = "CPU"):
        capabilities = core().get_property(device, "OPTIMIZATION_CAPABILITIES")  # the install's error first
        # the precision and the runtime are part of the provider list, which keys the cached batch
        # sizes and incremental plans: they never mix with onnxruntime's
        super().__init__(model, input_name, [f"OpenVINO-{device}-{precision}-{version()}"], model_key)
        self.precision = precision
        self.ov_device = device
        self._reference: OrtEngine | None = None
        hint = _CAPABILITIES[precision]
        if hint not in capabilities:
            raise DeviceError(
                f"precision={precision!r}: OpenVINO's {device} plugin cannot run {precision} on this "
                f"machine (its capabilities: {', '.join(capabilities)}); use precision='f32'"
                + (" or 'bf16'" if "BF16" in capabilities else "") + ".")

    def derived(self, model: onnx.ModelProto, input_name: str, model_key: str,
                spinning: bool | None = None) -> "OpenVinoEngine":
        """An engine of the same kind for another graph (incremental occlusion's stages and suffixes);
        ``spinning`` is onnxruntime's (OpenVINO's CPU threads have no such switch) and ignored."""
        return OpenVinoEngine(model, input_name, model_key, self.precision, self.ov_device)

    @property
    def on_cuda(self) -> bool:
        return False

    @property
    def reference(self) -> OrtEngine:
        """onnxruntime on the same graph (CPU): the independent float32 truth the torch module is
        checked against, and ``run_unoptimised``."""
        with self._lock:
            if self._reference is None:
                self._reference = OrtEngine(self.model, self.input_name, ["CPUExecutionProvider"],
                                            self.model_key)
                self._reference.guard = self.guard
        return self._reference

    def _config(self, single_thread: bool) -> dict:
        config = {"INFERENCE_PRECISION_HINT": _HINTS[self.precision]}
        if single_thread:
            streams = self.parallel_streams()
            config.update({"NUM_STREAMS": streams, "INFERENCE_NUM_THREADS": streams})
        else:
            config["PERFORMANCE_HINT"] = "LATENCY"
        return config

    def _open(self, data: bytes, single_thread: bool):
        try:
            compiled = core().compile_model(core().read_model(data), self.ov_device, self._config(single_thread))
        except ExplainerError:
            raise
        except Exception as exc:
            raise openvino_error(exc, None, compiling=True) from None
        return _Session(compiled, self.input_name, self.providers)

    def failure(self, exc: BaseException, shape) -> Exception:
        return openvino_error(exc, shape)

    def return_memory(self, example: np.ndarray, outputs: Sequence[str] | None = None,
                      single_thread: bool = False) -> None:
        """Nothing: onnxruntime's arenas only (an OpenVINO infer request keeps its buffers)."""

    def run_unoptimised(self, batch: np.ndarray, outputs: Sequence[str]) -> list[np.ndarray]:
        return self.reference.run_unoptimised(batch, outputs)

    def _throughput(self, batch: np.ndarray, outputs: Sequence[str], streams: int) -> float:
        try:
            return super()._throughput(batch, outputs, streams)
        except ExplainerError:
            raise
        except Exception as exc:
            raise openvino_error(exc, batch.shape) from None


def openvino_error(exc: BaseException, shape, compiling: bool = False) -> Exception:
    """The library's error for a failure inside OpenVINO (on a batch of ``shape``)."""
    where = "compiling the model" if compiling else f"a batch of shape {list(shape)}"
    if is_allocation_failure(exc):
        return allocation_error(exc, f"OpenVINO ({where})")
    text = str(exc).strip()
    lines = [l for l in text.splitlines() if l.strip() and not l.startswith(("Exception from", "Check "))]
    first = (lines or text.splitlines() or [type(exc).__name__])[0]
    error = UnsupportedModelError(
        f"OpenVINO cannot run the model ({where}): {first[:400]}. engine='onnxruntime' may still run it.")
    error.onnxruntime_message = first  # what the classifier's probe reads, whatever the engine
    return error


# engine="auto" ------------------------------------------------------------------------------------
def faster_engine(net, streams: int | None = None) -> str:
    """'openvino' or 'onnxruntime': which runs ``net``'s graph faster at float32, on the parallel
    streams the perturbation methods use, each at its best batch size; measured once per model and
    machine (and the two runtimes' versions) and remembered in ``cache_dir()/engines.json``."""
    import warnings

    import onnxruntime

    from .. import cache
    from ..errors import CacheError

    if not available() or net.ort.on_cuda:
        return "onnxruntime"
    key = (f"{net.ort.model_key}|{os.cpu_count()}|onnxruntime-{onnxruntime.__version__}|"
           f"openvino-{version()}")
    known = cache.read_json("engines.json").get(key)
    if known in ("onnxruntime", "openvino"):
        return known
    ort_engine = net.ort
    ov_engine = OpenVinoEngine(net.model, net.input.name, ort_engine.model_key, "f32")
    ov_engine.guard = ort_engine.guard
    streams = streams or ort_engine.parallel_streams()
    example, outputs = net._grey_input(), [net.output.name]
    rates = {}
    for name, engine in (("onnxruntime", ort_engine), ("openvino", ov_engine)):
        size = engine.best_batch_size(example, outputs, streams=streams)
        rates[name] = engine._throughput(np.repeat(example[None], size, axis=0), outputs, streams)
    best = max(rates, key=rates.get)
    try:
        cache.update_json("engines.json", key, best)
    except CacheError as exc:
        warnings.warn(f"the faster engine ({best}) is not remembered: {exc}", stacklevel=2)
    return best
