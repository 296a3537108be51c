"""Checks on a graph at the shape it will really run at, before onnxruntime or torch sees it.

* Zero or negative extents: a Conv, pool or Resize whose input or output has an extent of 0 or less
  (an image too small for the graph's strides and pools) is refused. onnxruntime divides by such
  extents in some kernels: at its full optimisation level a MaxPool or AveragePool producing a height
  of 0 (in its blocked NCHWc layout) and an InstanceNormalization reading one die with SIGFPE, taking
  the process with them (squeezenet with its input declared 3x7x224 did).
* Memory: the peak of the tensors alive at once during one run at batch 1 (from shape inference;
  sizes it cannot tell are measured once, in one unoptimised run), scaled by the batch size, must stay
  under ``limits.max_run_bytes()``; the torch path, which keeps every intermediate for the backward
  pass, is held to the same budget with the sum of all intermediates.
* Runs at once: the budget holds the runs in flight in the process together (parallel streams, the
  service's workers, a caller's threads, any classifier): ``RunGuard.hold`` counts an onnxruntime or
  OpenVINO run's bytes in ``IN_FLIGHT`` while it runs, the torch engine counts the largest pass of a
  turn on its module (``TorchEngine.exclusive``: the pass's graph lives until the backward is done), and
  a run that would take the total over the budget waits until enough of the others end (a run alone
  never waits: one over the budget by itself was refused). A run inside another of the same thread is
  counted without waiting.
* Allocation failures in onnxruntime or torch become ``ResourceLimitError`` (``allocation_error``).
"""
from __future__ import annotations

import collections
import itertools
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import onnx

from .. import limits
from ..errors import ResourceLimitError, UnsupportedModelError
from ..graph import all_nodes, constant_value, layer_name, reads, subgraphs, without_weight_data

#: ops that divide by (or index with) a spatial extent of their data input or output: zero or negative
#: extents there are refused. The ones seen to crash onnxruntime (SIGFPE, CPU provider, ORT_ENABLE_ALL)
#: are in ``CRASHED_ONNXRUNTIME``; the others fail with an error or compute garbage, refused alike.
ZERO_EXTENT_OPS = frozenset({
    "Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "FusedConv", "NhwcConv", "NhwcFusedConv",
    "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
    "QLinearAveragePool", "QLinearGlobalAveragePool", "NhwcMaxPool", "MaxRoiPool", "MaxUnpool", "RoiAlign",
    "Resize", "Upsample", "InstanceNormalization", "LRN", "SpaceToDepth", "DepthToSpace", "Col2Im",
    "GridSample", "AffineGrid", "DeformConv",
})
#: node kinds whose zero extent was seen to kill the process inside onnxruntime 1.x at ORT_ENABLE_ALL
#: (tests/test_fuzz.py builds each)
CRASHED_ONNXRUNTIME = ("MaxPool", "AveragePool", "InstanceNormalization")

_ALLOCATION_MARKERS = ("failed to allocate", "bad_alloc", "bfcarena", "can't allocate memory",
                       "out of memory", "cannot allocate memory", "allocation failed", "available memory of")


def is_allocation_failure(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = f"{type(exc).__name__} {exc}".lower()
    return any(m in text for m in _ALLOCATION_MARKERS)


def allocation_error(exc: BaseException, where: str) -> ResourceLimitError:
    """The library's error for a failed allocation ``exc`` in ``where`` (onnxruntime, torch)."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    error = ResourceLimitError(
        f"{where} could not allocate memory ({type(exc).__name__}: {first}); the run needs more memory "
        f"than the process may use. Use a smaller batch_size, lower limits.MAX_RUN_BYTES (environment "
        f"EXPLAINER_MAX_RUN_BYTES, now {limits.max_run_bytes()} bytes) so that such runs are refused "
        "before they start, or free memory.")
    error.allocation_failed = True
    return error


def _itemsize(elem: int) -> int:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)).itemsize
    except Exception:  # strings, unknown or 4-bit types: counted as 8 bytes a value, an upper bound
        return 8


def _raw_dims(vi: onnx.ValueInfoProto) -> list | None:
    """Dims as ints (negative and zero kept), None for symbolic ones; None without a shape."""
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]


def infer_at(model: onnx.ModelProto, image: str, shape: list[int],
             fixed: dict | None = None) -> dict[str, onnx.ValueInfoProto]:
    """Every tensor's inferred type and shape with the image input fixed to ``shape`` (and the other
    inputs named in ``fixed`` to theirs, {name: shape}); {} where
    inference fails outright (strict mode off: one unknown op leaves the rest inferred). The shapes a
    file declares for its outputs and intermediates are not trusted: inference starts without them (a
    declared output shape that contradicts the graph left everything after it unknown, and the run
    that measures unknown sizes then allocated what the graph asks for, 29 GB in one fuzzed file)."""
    shell = without_weight_data(model)
    if shell.ir_version < 4:  # before IR 4, inference ignores initializers not listed as inputs
        shell.ir_version = 4
    del shell.graph.value_info[:]
    for vi in shell.graph.output:
        vi.type.tensor_type.ClearField("shape")
    sizes = {**(fixed or {}), image: shape}
    for vi in shell.graph.input:
        if vi.name in sizes:
            dims = vi.type.tensor_type.shape.dim
            del dims[:]
            for d in sizes[vi.name]:
                dims.add().dim_value = int(d)
    try:
        inferred = onnx.shape_inference.infer_shapes(shell, strict_mode=False, data_prop=True)
    except Exception:
        return {}
    g = inferred.graph
    return {vi.name: vi for vi in list(g.value_info) + list(g.output)}


def peak_at(model: onnx.ModelProto, image: str, shape: list[int], fixed: dict | None = None) -> int | None:
    """The live-tensor peak (bytes) of one run of ``model`` with the image input at ``shape`` and the
    other inputs ``fixed`` ({name: shape}), from shape inference as ``estimate`` makes it (tensors whose
    size inference cannot tell not counted); None where inference fails outright. For the graphs the
    library writes around a classifier's (the explanation branches), whose runs count in the budget."""
    known = infer_at(model, image, shape, fixed)
    if not known:
        return None
    return estimate(model, image, shape, known).peak


def check_extents(model: onnx.ModelProto, image: str, shape: list[int], known: dict) -> None:
    """UnsupportedModelError for the first node of ``ZERO_EXTENT_OPS`` whose data input or output has
    an extent of 0 or less when the image is ``shape``."""
    inputs = {vi.name: vi for vi in model.graph.input}
    for node in model.graph.node:
        if node.op_type not in ZERO_EXTENT_OPS:
            continue
        for role, name in (("input", node.input[0] if node.input else ""),
                           ("output", node.output[0] if node.output else "")):
            vi = known.get(name) or (inputs.get(name) if name != image else None)
            dims = _raw_dims(vi) if vi is not None else None
            if name == image:
                dims = list(shape)
            if not dims or len(dims) < 3:
                continue
            if any(d is not None and d <= 0 for d in dims):
                raise UnsupportedModelError(
                    f"node {layer_name(node)!r} ({node.op_type}) would compute on a tensor {name!r} of shape "
                    f"{['?' if d is None else d for d in dims]} (its {role}) when the image input {image!r} "
                    f"is {list(shape)}: an extent of zero or less, which onnxruntime may divide by (its "
                    "pools crash the process so). The image is too small for the graph's strides and "
                    "pools: declare the input size the network was trained at (e.g. 224x224) in the "
                    "graph, or pass a larger size where the graph leaves it free.")


@dataclass
class Estimate:
    """Memory of one run at batch 1, from the tensors' shapes."""
    peak: int  # bytes alive at once at the worst node (intermediates, not weights)
    total: int  # bytes of every intermediate (what autograd keeps for a backward pass)
    largest: tuple[str, str, int]  # (node, op type, bytes) of the largest intermediate
    peak_node: tuple[str, str]  # the node at which the peak is reached
    unknown: list[str] = field(default_factory=list)  # tensors whose size was not known


def estimate(model: onnx.ModelProto, image: str, shape: list[int], known: dict,
             measured: dict[str, int] | None = None) -> Estimate:
    """The live-tensor peak and the total of intermediate sizes when the graph runs on ``shape``;
    ``measured``: byte sizes of tensors inference could not tell."""
    g = model.graph
    weights = {t.name for t in g.initializer}
    outputs = {o.name for o in g.output}
    measured = measured or {}
    last_use: dict[str, int] = {}
    for k, node in enumerate(g.node):
        for name in node.input:
            if name:
                last_use[name] = k
    sizes: dict[str, int] = {}
    unknown = []
    live, peak, total = 0, 0, 0
    largest, peak_node = ("", "", 0), ("", "")
    alive: dict[str, int] = {}
    image_bytes = int(np.prod(np.asarray(shape, dtype=np.float64))) * 4
    alive[image] = image_bytes
    live = image_bytes
    for k, node in enumerate(g.node):
        for name in node.output:
            if not name or name in weights:
                continue
            if name in measured:
                size = measured[name]
            else:
                vi = known.get(name)
                dims = _raw_dims(vi) if vi is not None else None
                if dims is None or any(d is None for d in dims):
                    unknown.append(name)
                    continue
                count = float(np.prod(np.asarray([max(d, 0) for d in dims], dtype=np.float64)))
                size = int(min(count * _itemsize(vi.type.tensor_type.elem_type), 1 << 62))
            sizes[name] = size
            alive[name] = size
            live += size
            total += size
            if size > largest[2]:
                largest = (layer_name(node), node.op_type, size)
        if live > peak:
            peak, peak_node = live, (layer_name(node), node.op_type)
        for name in [n for n in alive if last_use.get(n, -1) <= k and n not in outputs]:
            live -= alive.pop(name)
    return Estimate(peak, total, largest, peak_node, unknown)


def check_loops(model: onnx.ModelProto, image: str, shape: list[int], dtype, name: str = "model") -> None:
    """Refuse a Loop that could run more than ``limits.MAX_LOOP_ITERATIONS`` iterations at ``shape``:
    its trip count a constant, or computed and evaluated alone (onnxruntime runs only what that value
    needs: earlier loops were bounded before); a Loop without one (it runs while its condition holds),
    and one inside a subgraph whose trip count is not a constant, cannot be bounded and is refused."""
    limit = limits.MAX_LOOP_ITERATIONS
    if limit is None:
        return
    fix = (f"raise limits.MAX_LOOP_ITERATIONS (now {limit}; environment ONNX_EXPLAINER_MAX_LOOP_ITERATIONS, "
           "None for no bound) only for a trusted model")
    nested = [(inner, False) for node in model.graph.node for sub in subgraphs(node) for inner in all_nodes(sub)]
    for node, top in [(n, True) for n in model.graph.node] + nested:
        if node.op_type != "Loop":
            continue
        where = f"model {name!r}: Loop node {layer_name(node)!r}"
        trips = node.input[0] if node.input else ""
        if not trips:
            raise ResourceLimitError(f"{where} has no trip count: it runs as long as its condition holds, "
                                     f"which cannot be bounded before it runs. To go on: {fix}.")
        value = constant_value(model.graph, trips)
        if value is None and not top:
            raise ResourceLimitError(f"{where} (inside a subgraph) computes its trip count, which cannot be "
                                     f"bounded before it runs. To go on: {fix}.")
        if value is None:
            value = _evaluate(model, image, shape, dtype, trips)
        count = int(np.max(value)) if value is not None and np.size(value) else None
        if count is None or count > limit:
            told = "cannot be evaluated" if count is None else f"is {count}"
            raise ResourceLimitError(f"{where}: its trip count at input shape {list(shape)} {told}, over "
                                     f"limits.MAX_LOOP_ITERATIONS={limit}. To go on: {fix}.")


def _evaluate(model: onnx.ModelProto, image: str, shape: list[int], dtype, name: str):
    """The value of ``name`` in one unoptimised onnxruntime run on a zero image at ``shape`` (only what it
    needs runs); None where that fails."""
    g = model.graph
    producer = {o: k for k, n in enumerate(g.node) for o in n.output}
    needed, todo = set(), [name]
    while todo:  # the nodes ``name`` depends on (onnxruntime runs every node of a graph, fetched or not)
        k = producer.get(todo.pop())
        if k is not None and k not in needed:
            needed.add(k)
            todo.extend(i for i in reads(g.node[k]) if i)
    used = {i for k in needed for i in reads(g.node[k])}
    part = onnx.helper.make_graph(
        [g.node[k] for k in sorted(needed)], "trip_count", [vi for vi in g.input if vi.name == image],
        [onnx.helper.make_empty_tensor_value_info(name)], [t for t in g.initializer if t.name in used])
    part = onnx.helper.make_model(part, opset_imports=model.opset_import, ir_version=model.ir_version)
    try:
        return _run_unoptimised(part.SerializeToString(), image, shape, dtype, [name])[0]
    except Exception:
        return None


def _run_unoptimised(data: bytes, image: str, shape: list[int], dtype, names: list[str]) -> list:
    """``names`` from one onnxruntime run of the serialised graph ``data``, unoptimised, on the CPU, on a
    zero image at ``shape``; onnxruntime's exception where it fails."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return session.run(names, {image: np.zeros(shape, dtype)})


def _measure(model: onnx.ModelProto, image: str, shape: list[int], dtype, names: list[str]) -> dict[str, int]:
    """Byte sizes of ``names`` in one unoptimised onnxruntime run at ``shape``; {} where it fails (the
    classifier's probe reports why)."""
    outputs = model.graph.output
    declared = len(outputs)
    have = {o.name for o in outputs}
    outputs.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in have)
    try:
        data = model.SerializeToString()
    finally:
        del outputs[declared:]
    try:
        values = _run_unoptimised(data, image, shape, dtype, names)
    except Exception as exc:
        if is_allocation_failure(exc):
            raise allocation_error(exc, "onnxruntime (measuring the tensor sizes shape inference cannot "
                                        "tell, at batch 1)") from None
        return {}
    return {n: int(np.asarray(v).nbytes) for n, v in zip(names, values)}


class InFlight:
    """The bytes of the runs in flight in this process, and the wait that keeps them under the budget."""

    def __init__(self):
        self._changed = threading.Condition()
        self._local = threading.local()
        self.bytes = 0  # held now, every thread
        self.peak = 0  # the most held at once since the process started (or ``peak`` was reset)
        self._tickets = itertools.count()  # the order runs asked in
        self._waiting: collections.deque = collections.deque()  # tickets of the runs waiting, first asked first

    @contextmanager
    def hold(self, need: int):
        """Counts ``need`` bytes while the block runs; first waits while other runs are in flight and
        ``need`` would take their total over ``limits.max_run_bytes()`` (not when this thread already
        holds bytes: a run inside a run would wait for itself). Waiting runs go in the order they asked:
        a run does not pass one that waits before it, so a large run is not starved by smaller ones that
        keep fitting beside the others."""
        depth = getattr(self._local, "depth", 0)

        def crowded() -> bool:  # others in flight, and no room for this run beside them
            return self.bytes > 0 and self.bytes + need > limits.max_run_bytes()

        with self._changed:
            if depth == 0 and (self._waiting or crowded()):
                ticket = next(self._tickets)
                self._waiting.append(ticket)
                try:
                    while self._waiting[0] != ticket or crowded():
                        self._changed.wait()
                finally:
                    self._waiting.remove(ticket)
                    self._changed.notify_all()  # the next in line may fit too
            self.bytes += need
            self.peak = max(self.peak, self.bytes)
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            with self._changed:
                self.bytes -= need
                self._changed.notify_all()


#: the process's runs in flight (every classifier and engine share the budget)
IN_FLIGHT = InFlight()


def _mb(n: int) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


class RunGuard:
    """The checks of one graph and image input, per image shape (batch 1): made before the graph's first
    session; ``check(shape)`` before each run."""

    def __init__(self, model: onnx.ModelProto, image: str, dtype, name: str = "model"):
        self.model = model
        self.image = image
        self.dtype = np.dtype(dtype)
        self.name = name
        self._estimates: dict[tuple, Estimate] = {}

    def estimate_for(self, per_image: tuple, measure: bool = True) -> Estimate:
        """The checks at one image shape (without the batch): zero extents, then the memory estimate
        (unknown sizes measured once, unless ``measure`` is False); cached."""
        per_image = tuple(int(d) for d in per_image)
        found = self._estimates.get(per_image)
        if found is None:
            shape = [1, *per_image]
            known = infer_at(self.model, self.image, shape)
            check_extents(self.model, self.image, shape, known)
            check_loops(self.model, self.image, shape, self.dtype, self.name)
            found = estimate(self.model, self.image, shape, known)
            self._refuse(found, 1)
            if not measure:
                return found
            if found.unknown:
                measured = _measure(self.model, self.image, shape, self.dtype, found.unknown)
                if measured:
                    found = estimate(self.model, self.image, shape, known, measured)
                    self._refuse(found, 1)
            self._estimates[per_image] = found
        return found

    def _refuse(self, est: Estimate, batch: int, torch: bool = False) -> None:
        budget = limits.max_run_bytes()
        need = (est.total if torch else est.peak) * batch
        if need <= budget:
            return
        node, op, size = est.largest
        what = "the torch module (which keeps every intermediate for the backward pass)" if torch else "onnxruntime"
        fix = ("use a smaller batch_size" if batch > 1 else
               "the graph asks for more than the budget for a single image; raise limits.MAX_RUN_BYTES "
               "(environment EXPLAINER_MAX_RUN_BYTES) only for a trusted model on a machine with that memory")
        raise ResourceLimitError(
            f"model {self.name!r}: one run of {batch} image(s) in {what} needs about {_mb(need)} of "
            f"intermediate tensors, over the run budget limits.max_run_bytes()={_mb(budget)}; its largest "
            f"tensor is the output of node {node!r} ({op}), {_mb(size)} a run of one image (peak at "
            f"node {est.peak_node[0]!r}). To go on: {fix}.")

    def check(self, shape, torch: bool = False) -> None:
        """Refuses a run on a batch of ``shape`` (N, ...) over the budget (or with a zero extent)."""
        est = self.estimate_for(tuple(shape[1:]))
        self._refuse(est, max(int(shape[0]), 1), torch)

    def need(self, shape, torch: bool = False) -> int:
        """The bytes a run on a batch of ``shape`` (N, ...) is counted for (``torch``: every intermediate
        of the pass, which a backward pass keeps)."""
        est = self.estimate_for(tuple(shape[1:]))
        return (est.total if torch else est.peak) * max(int(shape[0]), 1)

    def hold(self, shape, refuse: bool = True):
        """``check(shape)`` (``refuse=False``: not again, for a batch sized under the budget already),
        then a context in which the run's bytes count in ``IN_FLIGHT`` (entered once the runs in flight
        leave room for them)."""
        if refuse:
            self.check(shape)
        return IN_FLIGHT.hold(self.need(shape))

    def max_batch(self, per_image: tuple, torch: bool = False) -> int:
        """The largest batch the budget allows (at least 1)."""
        est = self.estimate_for(per_image)
        need = max(est.total if torch else est.peak, 1)
        return max(1, limits.max_run_bytes() // need)
