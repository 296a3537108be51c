"""Forward passes in onnxruntime: cached sessions per set of requested outputs, batching, and the
measured best batch size.

Many batches (perturbation methods) run as parallel streams on the CPU: one single-threaded session
run per core at a time, instead of one run spread over all cores. On the 2-core development machine
that was as fast as the best single run at its best batch size and, unlike it, never fell into the 2x
slower mode a shared machine sometimes gives one multi-threaded run (e.g. 2.41-2.48 s against
2.54-5.15 s for 448 EfficientNet-Lite0 images at batch 2).

The engine knows nothing about explanation methods: it maps an input batch to named output arrays.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np
import onnx

from .. import cache
from ..errors import CacheError, ExplainerError, UnsupportedModelError
from ..graph import infer_shapes
from ..threads import keep_in_forks
from .budget import allocation_error, is_allocation_failure
from .providers import provider_options, quiet_session

BATCH_CANDIDATES = (1, 2, 4, 8, 16, 32, 64)
MAX_CACHED_SESSIONS = 4
#: onnxruntime's graph optimisations, tried in this order where the first changes a graph's function
#: (``OrtEngine.settle_optimisation``): (what it is called, whether any optimisation runs, the
#: optimisers turned off). onnxruntime's level-1 rewrite rules and constant folding gave a Hugging Face
#: BiT (weight-standardised convolutions) other scores than its nodes computed one by one, by 10-25 %
#: of their range (onnxruntime 1.31.1)
OPTIMISATIONS = (("all", True, ()),
                 ("all but the level-1 rewrite rules and constant folding", True,
                  ("Level1_RuleBasedTransformer", "ConstantFolding")),
                 ("none", False, ()))


class OrtEngine:
    engine = "onnxruntime"  # the runtime's name (the OpenVINO engine, a subclass, says "openvino")

    def __init__(self, model: onnx.ModelProto, input_name: str, providers: Sequence[str],
                 model_key: str, spinning: bool = False):
        self.model = model
        self.input_name = input_name
        self.providers = list(providers)
        self.model_key = model_key
        self._sessions: "OrderedDict[tuple[str, ...], object]" = OrderedDict()
        self._types: dict | None = None
        self.default_outputs = tuple(o.name for o in model.graph.output)
        self._lock = threading.Lock()
        #: ``budget.RunGuard`` of the graph (set by the classifier): each run's batch is checked against
        #: the memory budget and each new image shape for zero extents before onnxruntime sees it
        self.guard = None
        #: whether a multi-threaded CPU session's pool threads spin waiting for work (onnxruntime's default:
        #: within a run and for a while after it) or sleep (the library's default). Threads spinning after a
        #: run take the cores from whatever runs next: on the 2-core machine (benchmarks/spinning.py, run of
        #: 2026-12-07 19:08 UTC) Recipro-CAM's session 20 ms after a forward of the classifier's took 1.03x
        #: (EfficientNet-Lite0) and 1.31x (ResNet-18) as long idle, 1.26x and 1.17x beside a busy process per
        #: core (more beside other multi-threaded work), where spinning made back-to-back runs of one session
        #: at most 1.16x faster idle (Lite0, batch 1) and mostly slower under load. Stopping them when a
        #: run ends (``session.force_spinning_stop``) was 1.01-1.19x slower than never spinning. As
        #: OMP_WAIT_POLICY=PASSIVE for torch (explainer/threads.py)
        self.spinning = spinning
        #: the index in ``OPTIMISATIONS`` of the graph optimisations the sessions run with (0: all;
        #: ``settle_optimisation`` moves on where they change the graph's function)
        self.optimisation = 0

    # sessions -------------------------------------------------------------------------------------
    def _session_options(self, single_thread: bool = False):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 4  # failures reach the caller as exceptions; no red log lines
        if single_thread:
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
        elif not self.spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        return options

    def _serialised(self, extra: Sequence[str]) -> bytes:
        """The model's bytes with ``extra`` tensors as further graph outputs (typed from shape
        inference); they are added for the serialisation only, so the weights are not copied."""
        outputs = self.model.graph.output
        with self._lock:
            if extra and self._types is None:
                self._types = infer_shapes(self.model)
            for name in extra:
                vi = self._types.get(name)
                elem = vi.type.tensor_type.elem_type if vi is not None else onnx.TensorProto.FLOAT
                outputs.append(onnx.helper.make_tensor_value_info(name, elem or 1, None))
            try:
                return self.model.SerializeToString()
            finally:
                del outputs[len(self.default_outputs):]

    def derived(self, model: onnx.ModelProto, input_name: str, model_key: str,
                spinning: bool | None = None) -> "OrtEngine":
        """An engine of the same kind and providers for another graph (incremental occlusion's stages);
        ``spinning`` as this one's unless given; the graph optimisations as this one's (the derived graphs
        hold this one's nodes)."""
        engine = OrtEngine(model, input_name, self.providers, model_key,
                           self.spinning if spinning is None else spinning)
        engine.optimisation = self.optimisation
        return engine

    @property
    def reference(self) -> "OrtEngine":
        """The onnxruntime engine float32 results are checked against: this one (another engine, e.g.
        OpenVINO's, gives onnxruntime's on the same graph)."""
        return self

    @property
    def on_cuda(self) -> bool:
        return "CUDAExecutionProvider" in self.providers

    def parallel_streams(self) -> int:
        """How many batches to run at once: one per available core on the CPU, one on a GPU."""
        if self.on_cuda:
            return 1
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            return max(1, os.cpu_count() or 1)

    def session(self, outputs: Sequence[str] = (), single_thread: bool = False):
        """A session whose graph outputs include ``outputs`` (cached, least recently used dropped);
        ``single_thread``: one core per run, for parallel streams (CPU only)."""
        extra = tuple(o for o in dict.fromkeys(outputs) if o not in self.default_outputs)
        single_thread = single_thread and not self.on_cuda
        key = (extra, single_thread)
        with self._lock:
            if key in self._sessions:
                self._sessions.move_to_end(key)
                return self._sessions[key]
        session = self._open(self._serialised(extra), single_thread)
        with self._lock:
            self._sessions[key] = session
            while len(self._sessions) > MAX_CACHED_SESSIONS:
                self._sessions.popitem(last=False)
        return session

    def drop_sessions(self, outputs: Sequence[str] | None = None, *, keep_plain: bool = False) -> None:
        """Closes the cached sessions whose further outputs are ``outputs`` (None: every session), with
        the memory they hold (their copy of the weights, their arena); ``session`` opens them again on
        next use. ``keep_plain``: the plain session (the graph's own outputs, not single-threaded:
        ``session()``) stays open."""
        plain = ((), False)
        with self._lock:
            if outputs is None:
                for key in [k for k in self._sessions if not (keep_plain and k == plain)]:
                    del self._sessions[key]
                return
            extra = tuple(o for o in dict.fromkeys(outputs) if o not in self.default_outputs)
            for key in [k for k in self._sessions if k[0] == extra and not (keep_plain and k == plain)]:
                del self._sessions[key]

    def _open(self, data: bytes, single_thread: bool):
        """A new runtime session of the serialised graph ``data`` (``session`` caches it)."""
        import onnxruntime as ort

        _, optimise, disabled = OPTIMISATIONS[self.optimisation]
        if self.on_cuda:
            return keep_in_forks(quiet_session(data, self.providers, optimise, disabled))
        options = self._session_options(single_thread)
        extra = self.optimised(options)
        return keep_in_forks(ort.InferenceSession(data, options, providers=self.providers,
                                                  provider_options=provider_options(self.providers), **extra))

    def settle_optimisation(self, x: np.ndarray, output: str, tolerance: float) -> float | None:
        """Checks that onnxruntime's graph optimisations keep the graph's function: ``output`` of input
        ``x`` against the same graph run with none (each node as the ONNX spec defines it). Where they
        differ by more than ``tolerance`` of the largest magnitude, the next setting of
        ``OPTIMISATIONS`` that agrees is kept (the cached sessions closed) and the relative difference
        of the full set is returned; None where it agrees. The verdict is remembered per model, providers
        and versions in ``cache_dir()/optimisations.json``, as the best batch size is."""
        def relative(a: np.ndarray, b: np.ndarray) -> float:
            finite = np.isfinite(b)
            if a.shape != b.shape or not np.array_equal(np.isfinite(a), finite):
                return float("inf")
            scale = max(float(np.abs(b[finite]).max(initial=0.0)), 1e-12)
            return float(np.abs(a[finite].astype(np.float64) - b[finite]).max(initial=0.0)) / scale

        import onnxruntime as ort

        from ..version import __version__

        key = (f"{self.model_key}|{','.join(self.providers)}|{output}|{tolerance}|onnxruntime {ort.__version__}|"
               f"explainer {__version__}")
        known = cache.read_json("optimisations.json").get(key)
        if isinstance(known, list) and len(known) == 2 and known[0] in range(len(OPTIMISATIONS)):
            if known[0]:
                self.optimisation = known[0]
                self.drop_sessions()
            return known[1]
        try:
            reference = self.run_unoptimised(x, [output])[0]
        except ExplainerError:  # the graph unoptimised does not run here (memory, a kernel): left unchecked
            return None
        first = None
        for index, (_, optimise, _) in enumerate(OPTIMISATIONS):
            if index:
                self.optimisation = index
                self.drop_sessions()
            if not optimise:
                break
            error = relative(self.run(x, [output])[0], reference)
            first = error if first is None else first
            if error <= tolerance:
                break
        drift = None if self.optimisation == 0 else first
        with contextlib.suppress(CacheError):  # an unwritable cache: checked again at the next load
            cache.update_json("optimisations.json", key, [self.optimisation, drift])
        return drift

    def optimised(self, options) -> dict:
        """``options`` (onnxruntime SessionOptions of another session of this engine's graph, e.g. the
        in-graph Grad-CAM's) set to this engine's graph optimisations; returns the further keyword
        arguments of ``InferenceSession`` they need."""
        import onnxruntime as ort

        _, optimise, disabled = OPTIMISATIONS[self.optimisation]
        if not optimise:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return {"disabled_optimizers": list(disabled)} if disabled else {}

    @property
    def optimisation_name(self) -> str:
        """The graph optimisations the sessions run with (``OPTIMISATIONS``)."""
        return OPTIMISATIONS[self.optimisation][0]

    def run_unoptimised(self, batch: np.ndarray, outputs: Sequence[str]) -> list[np.ndarray]:
        """One forward pass with every graph optimisation off: each node computed as the ONNX spec
        defines it, no fusions (e.g. no QLinearConv for a DequantizeLinear-Conv-QuantizeLinear group).
        Not cached: for one-off comparisons."""
        import onnxruntime as ort

        options = self._session_options()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        extra = [o for o in dict.fromkeys(outputs) if o not in self.default_outputs]
        held = self.held(batch.shape)
        try:
            session = ort.InferenceSession(self._serialised(extra), options, providers=["CPUExecutionProvider"])
            with held:
                return session.run(list(outputs), {self.input_name: batch})
        except Exception as exc:
            raise ort_error(exc, batch.shape) from None

    @property
    def active_providers(self) -> list[str]:
        return self.session().get_providers()

    # running --------------------------------------------------------------------------------------
    def run(self, batch: np.ndarray, outputs: Sequence[str]) -> list[np.ndarray]:
        """One forward pass of the whole ``batch``: checked by the guard first; a failed allocation is a
        ``ResourceLimitError``, any other onnxruntime failure an ``UnsupportedModelError``."""
        held = self.held(batch.shape)
        try:
            with held:
                return self.session(outputs).run(list(outputs), {self.input_name: batch})
        except ExplainerError:
            raise
        except Exception as exc:
            raise self.failure(exc, batch.shape) from None

    def held(self, shape):
        """The guard's ``hold`` for a run on a batch of ``shape`` (refused over the budget now, counted
        among the runs in flight while the block runs); nothing for an engine without a guard."""
        return self.guard.hold(shape) if self.guard is not None else contextlib.nullcontext()

    def failure(self, exc: BaseException, shape) -> Exception:
        """The library's error for a run of ``shape`` that failed with ``exc`` in the runtime."""
        return ort_error(exc, shape)

    def run_batched(self, inputs: np.ndarray, outputs: Sequence[str], batch_size: int) -> list[np.ndarray]:
        """Forward ``inputs`` in chunks of ``batch_size`` and concatenate."""
        parts = [self.run(inputs[i:i + batch_size], outputs) for i in range(0, len(inputs), batch_size)]
        return [np.concatenate([p[k] for p in parts]) for k in range(len(outputs))]

    # batch size -----------------------------------------------------------------------------------
    def best_batch_size(self, example: np.ndarray, outputs: Sequence[str], streams: int = 1) -> int:
        """The batch size with the highest measured throughput, on one session or on ``streams``
        parallel one-core sessions (how the perturbation methods run), measured once per model,
        device, machine and stream count and cached in ``cache_dir()/batch_sizes.json``."""
        key = f"{self.model_key}|{','.join(self.providers)}|{os.cpu_count()}"
        if streams > 1:
            key += f"|streams={streams}"
        # the memory budget bounds the candidates (and a size remembered under a larger budget)
        limit = BATCH_CANDIDATES[-1]
        if self.guard is not None:
            limit = max(1, self.guard.max_batch(tuple(example.shape)) // max(streams, 1))
        known = cache.read_json("batch_sizes.json").get(key)
        if isinstance(known, int) and known >= 1:
            return min(known, limit)
        try:
            best = fastest_batch(lambda size: self._throughput(np.repeat(example[None], size, axis=0), outputs,
                                                               streams), limit)
        finally:  # the session stays cached: its arena, grown to the largest candidate, need not
            self.return_memory(example[None], outputs, streams > 1)
        try:
            cache.update_json("batch_sizes.json", key, best)
        except CacheError as exc:  # a full or read-only disk costs a re-measurement, not the result
            warnings.warn(f"the measured batch size {best} is not remembered: {exc}", stacklevel=2)
        return best

    def return_memory(self, example: np.ndarray, outputs: Sequence[str] | None = None,
                      single_thread: bool = False) -> None:
        """Gives back to the OS the CPU memory that cached sessions keep in their arenas, the sessions
        themselves kept: onnxruntime's arena grows to a session's largest run and keeps it (the batch
        sizes 'auto' tries, up to 64 Lite0 images, held about 380-530 MB for as long as the classifier
        lived). The session for ``outputs`` and ``single_thread`` (None: every cached session) runs
        ``example`` (one model input, batch dim included) once with onnxruntime's arena shrinkage; a
        later larger run allocates again. Nothing on CUDA."""
        if self.on_cuda:
            return
        with self._lock:
            if outputs is None:
                sessions = list(self._sessions.values())
            else:
                extra = tuple(o for o in dict.fromkeys(outputs) if o not in self.default_outputs)
                sessions = [self._sessions[key] for key in [(extra, single_thread)] if key in self._sessions]
        if not sessions:
            return
        import onnxruntime as ort

        options = ort.RunOptions()
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        for session in sessions:
            try:
                session.run([self.default_outputs[0]], {self.input_name: example}, options)
            except Exception:  # noqa: BLE001 - memory not given back is no error of the caller's work
                pass

    def _throughput(self, batch: np.ndarray, outputs: Sequence[str], streams: int) -> float:
        """Images per second forwarding ``batch`` again and again (at least 0.2 s) in each stream."""
        session = self.session(outputs, single_thread=streams > 1)
        names, feed = list(outputs), {self.input_name: batch}
        if self.guard is not None:  # the streams run at once: each gets its share of the budget
            self.guard.check((len(batch) * streams, *batch.shape[1:]))
        try:
            return stream_throughput(lambda: session.run(names, feed), len(batch), streams)
        except ExplainerError:
            raise
        except Exception as exc:
            raise ort_error(exc, batch.shape) from None


def fastest_batch(rate: Callable[[int], float], limit: int = BATCH_CANDIDATES[-1]) -> int:
    """The batch size among ``BATCH_CANDIDATES`` up to ``limit`` with the highest ``rate(size)`` (items
    per second), tried in increasing order: a size replaces the best so far only when 5 % faster, and two
    sizes in a row that are not end the search. ``OrtEngine.best_batch_size``'s measurement, and
    incremental occlusion's (``incremental.Occluder.best_batch``)."""
    best, best_rate, worse = 1, 0.0, 0
    for size in [c for c in BATCH_CANDIDATES if c <= max(1, limit)]:
        measured = rate(size)
        if measured > best_rate * 1.05:
            best, best_rate, worse = size, measured, 0
        else:
            worse += 1
            if worse >= 2:
                break
    return best


def stream_throughput(run: Callable[[], object], size: int, streams: int) -> float:
    """Items per second of ``run()`` (one batch of ``size`` items) called again and again (at least 0.2 s
    and twice) in each of ``streams`` parallel threads at once, after one warm-up call in each."""

    def timed(_) -> int:
        start, runs = time.perf_counter(), 0
        while time.perf_counter() - start < 0.2 or runs < 2:
            run()
            runs += 1
        return runs

    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(lambda _: run(), range(streams)))  # warm-up
        start = time.perf_counter()
        runs = sum(pool.map(timed, range(streams)))
        return size * runs / (time.perf_counter() - start)


def ort_error(exc: BaseException, shape) -> Exception:
    """The library's error for a failure inside onnxruntime on a batch of ``shape``."""
    if is_allocation_failure(exc):
        return allocation_error(exc, f"onnxruntime (a batch of shape {list(shape)})")
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    error = UnsupportedModelError(
        f"onnxruntime cannot run the model on a batch of shape {list(shape)}: {first[:400]}. The graph "
        "fails there as exported; check it with onnxruntime alone (a batch of 1 at its declared size).")
    error.onnxruntime_message = first
    return error
