"""Grad-CAM maps computed by onnxruntime through the differentiated head: the library's in-graph path
(issue 27, point 5). ``cam_maps(net, x, targets)`` runs one session of the library's normalised graph
(``net.model``: any batch) with the explanation branch of ``build_explained`` and a (N, K) ``target``
input, and returns (N, K, h, w) maps at the feature layer's resolution, as ``BaseCAM.low_resolution``
does for each image. ``pixel_cam_maps(net, pixels, targets)`` is the same from the images' pixels at
the model's size: the session the library opens normalises them itself where it can (``_normalising``:
``net.to_model_input``'s float32 operations written as nodes in front of the graph, bit for bit), one
numpy pass less per call.

``choose(net, method, feature_layer)`` decides once per classifier, method and layer whether that path
runs: it does where the branch can be written (every op of the head has a gradient rule) and
onnxruntime opens the session; otherwise the answer is ``torch`` with the reason, and the library's
CAMs run on the converted module. The decisions and sessions are kept per classifier (weakly: they go
with it)."""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import NamedTuple

import numpy as np

from .. import limits
from ..errors import ExplainerError, InvalidParameterError, ResourceLimitError
from ..registries import register_classifier_cache
from ..runtime.feature_layers import default_feature_layer
from ..runtime.ort_engine import ort_error
from ..threads import keep_in_forks
from .writer import SALIENCY, TARGET, build_explained

#: classifier -> {(method, layer name): (EngineChoice, session, None (the torch path) or CLOSED,
#: BranchCost or None)}, the most recently used entry last
_SESSIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()
register_classifier_cache("in-graph Grad-CAM sessions", _SESSIONS, lock=_LOCK)
#: how many in-graph sessions a classifier keeps open (each holds a copy of the model's weights, about
#: 55 MB on EfficientNet-Lite0, and its arena): the least recently used beyond it are closed, their
#: decisions kept, and opened again on next use
MAX_OPEN = 4
#: an entry whose session was closed (``MAX_OPEN``)
CLOSED = "closed"

ONNXRUNTIME, TORCH = "onnxruntime", "torch"
DIFFERENTIATED = "differentiated head"


class Decision(str):
    """A choice between two ways of computing the same thing, with ``reason``: ``in_graph`` when it is the
    way through a graph with the explanation written in it; ``describe()`` gives both, e.g.
    "onnxruntime (differentiated head)". Read by ``gradcam_engine`` and ``recipro_cam_engine``."""

    def __new__(cls, value: str, reason: str, in_graph: bool):
        choice = super().__new__(cls, value)
        choice.reason, choice.in_graph = reason, in_graph
        return choice

    def describe(self) -> str:
        return f"{self} ({self.reason})"


class EngineChoice(Decision):
    """Where the library's Grad-CAM (or Grad-CAM++) runs: ``"onnxruntime"`` (the head differentiated in
    the graph, one session call for all images and labels) or ``"torch"`` (forward and backward on the
    converted module), with ``reason``, e.g. "torch (head op Selu has no gradient rule)"."""

    def __new__(cls, engine: str, reason: str):
        return super().__new__(cls, engine, reason, engine == ONNXRUNTIME)


def _why_not(exc: BaseException) -> str:
    """The reason a branch could not be built, short: the op without a rule where known, else the
    error's first sentence without its "export: " prefix."""
    op = getattr(exc, "op_type", None)
    if op:
        return f"head op {op} has no gradient rule"
    text = str(exc).split(": ", 1)[1] if str(exc).startswith(("export: ", "export_explained: ", "gradcam: ",
                                                              "gradcam_plus_plus: ")) else str(exc)
    first = text.split(". ")[0].rstrip(".")
    return first[:300]


def layer_key(net, feature_layer) -> str:
    """The layer's name (the default layer's for None): the key of the per-layer decision."""
    return default_feature_layer(net)[0] if feature_layer is None else net.layer(feature_layer).name


#: the input of the library's session where it normalises the image itself (N, H, W, C pixels, 0..255)
PIXELS = "explain/pixels"


class BranchCost(NamedTuple):
    """The memory of one run of the graph with the branch: about ``images * (per_image + per_target *
    K)`` bytes for ``images`` images and K target classes each (the forward pass and the head's
    gradient for each class; the gradient of a head that pads or tiles the feature map is the size of
    what it pads: a fuzzed head's Pad made one image's run 384 MB where the forward's peak is 96 MB)."""
    per_image: int
    per_target: int

    def bytes(self, images: int, k: int) -> int:
        return max(int(images), 1) * (self.per_image + self.per_target * max(int(k), 1))


def _branch_cost(net, model) -> BranchCost | None:
    """The explained ``model``'s live-tensor peak for one image at K = 1 and K = 2 target classes
    (``budget.peak_at``: shape inference, as the run budget estimates a classifier's graph), as a
    ``BranchCost``; None where inference cannot tell."""
    from ..runtime.budget import peak_at

    shape = [1, *net.per_image_shape]
    peaks = [peak_at(model, net.input.name, shape, {TARGET: [1, k]}) for k in (1, 2)]
    if None in peaks:
        return None
    per_target = max(peaks[1] - peaks[0], 0)
    return BranchCost(max(peaks[0] - per_target, 0), per_target)


def _open(net, method: str, layer: str, pixels: bool = True) -> tuple:
    """(the session of ``net.model`` plus the branch, its ``BranchCost`` or None); with ``pixels`` and
    where ``_normalising`` can write the library's preprocessing as nodes, the session's input is the
    images' pixels (``PIXELS``). Refused (``ResourceLimitError``) where one image's run at K = 1 is over
    the run budget."""
    import onnxruntime as ort

    model = build_explained(net, method, layer, 0, "feature", source=net.model, targets_per_image=True,
                            diagnostics=True, where=method)
    cost = _branch_cost(net, model) if getattr(net.ort, "guard", None) is not None else None
    if cost is not None and cost.bytes(1, 1) > limits.max_run_bytes():
        raise ResourceLimitError(
            f"{method}: the graph with the differentiated head needs about {cost.bytes(1, 1) / (1 << 20):,.1f} "
            f"MiB for one image and one class, over the run budget limits.max_run_bytes()="
            f"{limits.max_run_bytes() / (1 << 20):,.1f} MiB")
    if pixels:
        _normalising(net, model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    extra = net.ort.optimised(options)  # the classifier's graph optimisations (settle_optimisation)
    providers = list(getattr(net.ort, "providers", None) or ["CPUExecutionProvider"])
    return keep_in_forks(ort.InferenceSession(model.SerializeToString(), options, providers=providers,
                                              **extra)), cost


def takes_pixels(run) -> bool:
    """Whether the session's image input is the pixels (``PIXELS``: it normalises them itself)."""
    return any(i.name == PIXELS for i in run.get_inputs())


def _normalising(net, model) -> bool:
    """``net.to_model_input`` written in front of ``model`` (in place): the graph then takes (N, H, W, C)
    float32 pixels as ``PIXELS`` and computes the same float32 operations in the same order (channel
    order, ``* scale``, ``- mean``, ``/ std``, then NCHW), so the maps are those of the normalised input
    bit for bit. False (nothing changed) for what it does not cover: other input types, layouts, opsets."""
    from onnx import TensorProto, helper, numpy_helper

    spec, p = net.input, net.preprocessing
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    graph = model.graph
    if spec.dtype != np.float32 or spec.layout not in ("NCHW", "NHWC") or opset < 10 or model.ir_version < 4 \
            or any(i.name == PIXELS for i in graph.input) or not any(i.name == spec.name for i in graph.input):
        return False
    c = spec.channels
    mean = np.asarray(p.mean[:c] if len(p.mean) == 3 else p.mean * c, dtype=np.float32)
    std = np.asarray(p.std[:c] if len(p.std) == 3 else p.std * c, dtype=np.float32)
    if mean.shape != (c,) or std.shape != (c,):
        return False
    nodes, inits, x = [], [], PIXELS

    def step(op, *inputs, **attrs):
        name = f"{PIXELS}/{op.lower()}_{len(nodes)}"
        nodes.append(helper.make_node(op, [x, *inputs], [name], name=name + "_node", **attrs))
        return name

    def const(value, hint):
        inits.append(numpy_helper.from_array(np.asarray(value), f"{PIXELS}/{hint}_{len(inits)}"))
        return inits[-1].name

    # NCHW first: onnxruntime broadcasts a per-channel constant fast over H x W, slowly over the last
    # axis of 3 channels (0.6 ms per op on 224 x 224, more than numpy); constants the same for every
    # channel are scalars
    axis = 3
    if spec.layout == "NCHW":
        x, axis = step("Transpose", perm=[0, 3, 1, 2]), 1
    uniform = bool(np.all(mean == mean[0]) and np.all(std == std[0]))
    if not uniform and axis == 3:
        return False  # numpy's path is the faster one there

    def per_channel(values):
        return values[0] if uniform else values.reshape(c, 1, 1)

    if p.channel_order == "BGR" and c == 3:
        x = step("Slice", const(np.asarray([-1], np.int64), "start"),
                 const(np.asarray([np.iinfo(np.int64).min], np.int64), "end"),
                 const(np.asarray([axis], np.int64), "axis"), const(np.asarray([-1], np.int64), "step"))
    if np.float32(p.scale) != np.float32(1.0):  # x * 1 is x: no node for it
        x = step("Mul", const(np.float32(p.scale), "scale"))
    x = step("Sub", const(per_channel(mean), "mean"))
    x = step("Div", const(per_channel(std), "std"))
    nodes[-1].output[0] = spec.name
    image = next(i for i in graph.input if i.name == spec.name)
    dims = [d.dim_param or d.dim_value or None for d in image.type.tensor_type.shape.dim]
    if len(dims) != 4:
        return False
    batch = dims[0] or "N"
    graph.input.remove(image)
    graph.input.insert(0, helper.make_tensor_value_info(PIXELS, TensorProto.FLOAT, [batch, spec.height, spec.width, c]))
    for n in reversed(nodes):
        graph.node.insert(0, n)
    graph.initializer.extend(inits)
    return True


def _entry(net, method: str, feature_layer, pixels: bool = True) -> tuple:
    """(EngineChoice, session or None, BranchCost or None) for ``method`` at ``feature_layer``."""
    layer = layer_key(net, feature_layer)
    key = (method, layer) if pixels else (method, layer, "model input")
    with _LOCK:
        per_net = _SESSIONS.setdefault(net, OrderedDict())
        if key in per_net and per_net[key][1] is not CLOSED:
            per_net.move_to_end(key)
            return per_net[key]
        if key in per_net:  # closed to bound the memory: opened again, the decision stands
            per_net[key] = (per_net[key][0], *_open(net, method, layer, pixels))
        else:
            try:
                per_net[key] = (EngineChoice(ONNXRUNTIME, DIFFERENTIATED), *_open(net, method, layer, pixels))
            except ExplainerError as exc:  # no rule for an op of the head, an opset too old, over the budget, ...
                per_net[key] = (EngineChoice(TORCH, _why_not(exc)), None, None)
            except Exception as exc:  # onnxruntime refuses the written graph (an op on this provider, ...)
                per_net[key] = (EngineChoice(TORCH, f"onnxruntime cannot run the differentiated head: "
                                                    f"{type(exc).__name__}: {str(exc)[:200]}"), None, None)
        per_net.move_to_end(key)
        open_keys = [k for k, (_, s, _) in per_net.items() if s is not None and s is not CLOSED]
        for old_key in open_keys[:-MAX_OPEN]:
            per_net[old_key] = (per_net[old_key][0], CLOSED, per_net[old_key][2])
        return per_net[key]


def choose(net, method: str = "gradcam", feature_layer=None) -> EngineChoice:
    """Where ``method`` ("gradcam" or "gradcam_plus_plus") runs for ``net`` at ``feature_layer`` (None:
    the default layer): decided once (the branch built and its session opened, or the reason it cannot
    be), then read from the per-classifier table."""
    return _entry(net, method, feature_layer)[0]


def session(net, method: str = "gradcam", feature_layer=None, pixels: bool = True):
    """The onnxruntime session of ``net.model`` plus the ``method`` branch (built once per layer); its
    input is the images' pixels where it normalises them itself (``takes_pixels``), unless
    ``pixels`` is False: then the model's input, always."""
    if not pixels:
        run = session(net, method, feature_layer)  # the decision (and its reason) is the pixel session's
        if not takes_pixels(run):
            return run
    choice, run, _ = _entry(net, method, feature_layer, pixels)
    if run is None:
        raise InvalidParameterError(f"{method}: the in-graph path cannot run at layer "
                                    f"{layer_key(net, feature_layer)!r}: {choice.reason}.")
    return run


def _chunk(net, k: int, cost: BranchCost | None) -> int:
    """Images per session call: all of them unless the run budget (the branch's ``cost`` of one image
    with K classes; without one, one image's forward and the gradient of K classes beside it) says
    fewer."""
    if cost is not None:
        return max(1, limits.max_run_bytes() // max(cost.bytes(1, k), 1))
    guard = getattr(net.ort, "guard", None)
    if guard is None:
        return 1 << 30
    try:
        return max(1, guard.max_batch(net.per_image_shape) // max(1, k))
    except Exception:  # no estimate for this graph: the whole call at once, as before
        return 1 << 30


def _held(net, cost: BranchCost | None, images: int, k: int):
    """The run's bytes counted among the runs in flight (``budget.IN_FLIGHT``) while it runs: the branch's
    ``cost``, refused over the budget (``ResourceLimitError`` naming the fix); without a cost, the
    classifier's own guard for the forward pass of ``images`` images."""
    if cost is None:
        return net.ort.held((images, *net.per_image_shape))
    from ..runtime.budget import IN_FLIGHT

    need = cost.bytes(images, k)
    if need > limits.max_run_bytes():
        raise ResourceLimitError(
            f"Grad-CAM in the graph: {images} image(s) with {k} classes each need about {need / (1 << 20):,.1f} MiB "
            f"in one run, over the run budget limits.max_run_bytes()={limits.max_run_bytes() / (1 << 20):,.1f} "
            "MiB. To go on: ask for fewer classes per call.")
    return IN_FLIGHT.hold(need)


def cam_maps(net, x: np.ndarray, targets, method: str = "gradcam", feature_layer=None,
             with_unaveraged: bool = False):
    """(N, K, h, w) float32 maps of model input ``x`` (N, ...) for ``targets`` (N, K) class indices;
    with ``with_unaveraged``, also (N, K): each map's peak of sum_c mean|g| |A|, for the library's
    refusal of maps at float32 noise level (``BaseCAM._refuse_degenerate``)."""
    return _maps(net, session(net, method, feature_layer, pixels=False), x, targets, with_unaveraged,
                 _entry(net, method, feature_layer)[2])


def pixel_cam_maps(net, pixels: np.ndarray, targets, method: str = "gradcam", feature_layer=None,
                   with_unaveraged: bool = False):
    """``cam_maps`` of (N, H, W, C) pixels at the model's size (``net.fit_pixels``): the session
    normalises them itself where it can (the same float32 operations as ``net.to_model_input``, in
    onnxruntime), else they are normalised here."""
    run = session(net, method, feature_layer)
    if not takes_pixels(run):
        return cam_maps(net, net.to_model_input(pixels), targets, method, feature_layer, with_unaveraged)
    return _maps(net, run, np.ascontiguousarray(pixels, dtype=np.float32), targets, with_unaveraged,
                 _entry(net, method, feature_layer)[2])


def _maps(net, run, x: np.ndarray, targets, with_unaveraged: bool, cost: BranchCost | None = None):
    targets = np.asarray(targets, np.int64)
    if targets.ndim == 1:
        targets = np.broadcast_to(targets[None], (len(x), len(targets)))
    # graphs that keep their exported batch: one image a call; others: every image in one call, unless
    # the run budget says fewer
    step = 1 if net.max_batch == 1 or len(x) == 1 else min(len(x), _chunk(net, targets.shape[1], cost))
    names = [SALIENCY, f"{SALIENCY}_unaveraged"]
    image = PIXELS if takes_pixels(run) else net.input.name
    parts = []
    for i in range(0, len(x), step):
        batch = x[i:i + step]
        shape = (len(batch), *net.per_image_shape)  # the model's input, whichever the session takes
        held = _held(net, cost, len(batch), targets.shape[1])  # refused over the budget
        try:
            with held:
                parts.append(run.run(names, {image: batch, TARGET: np.ascontiguousarray(targets[i:i + step])}))
        except ExplainerError:
            raise
        except Exception as exc:  # as the forward passes: a failed allocation or run is the library's error
            raise ort_error(exc, shape) from None
    maps = np.concatenate([p[0] for p in parts])
    return (maps, np.concatenate([p[1] for p in parts])) if with_unaveraged else maps
