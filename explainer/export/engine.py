"""Grad-CAM maps computed by onnxruntime through the differentiated head: the library's in-graph path
(issue 27, point 5). ``cam_maps(net, x, targets)`` runs one session of the library's normalised graph
(``net.model``: any batch) with the explanation branch of ``build_explained`` and a (N, K) ``target``
input, and returns (N, K, h, w) maps at the feature layer's resolution, as ``BaseCAM.low_resolution``
does for each image.

``choose(net, method, feature_layer)`` decides once per classifier, method and layer whether that path
runs: it does where the branch can be written (every op of the head has a gradient rule) and
onnxruntime opens the session; otherwise the answer is ``torch`` with the reason, and the library's
CAMs run on the converted module. The decisions and sessions are kept per classifier (weakly: they go
with it)."""
from __future__ import annotations

import threading
import weakref

import numpy as np

from ..errors import ExplainerError, InvalidParameterError
from ..runtime.feature_layers import default_feature_layer
from ..runtime.ort_engine import ort_error
from .writer import SALIENCY, TARGET, build_explained

#: classifier -> {(method, layer name): (EngineChoice, session or None)}
_SESSIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()

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


def _open(net, method: str, layer: str):
    import onnxruntime as ort

    model = build_explained(net, method, layer, 0, "feature", source=net.model, targets_per_image=True,
                            diagnostics=True, where=method)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    providers = list(getattr(net.ort, "providers", None) or ["CPUExecutionProvider"])
    return ort.InferenceSession(model.SerializeToString(), options, providers=providers)


def _entry(net, method: str, feature_layer) -> tuple:
    layer = layer_key(net, feature_layer)
    key = (method, layer)
    per_net = _SESSIONS.get(net)
    if per_net is not None and key in per_net:
        return per_net[key]
    with _LOCK:
        per_net = _SESSIONS.setdefault(net, {})
        if key not in per_net:
            try:
                per_net[key] = (EngineChoice(ONNXRUNTIME, DIFFERENTIATED), _open(net, method, layer))
            except ExplainerError as exc:  # no rule for an op of the head, an opset too old, ...
                per_net[key] = (EngineChoice(TORCH, _why_not(exc)), None)
            except Exception as exc:  # onnxruntime refuses the written graph (an op on this provider, ...)
                per_net[key] = (EngineChoice(TORCH, f"onnxruntime cannot run the differentiated head: "
                                                    f"{type(exc).__name__}: {str(exc)[:200]}"), None)
        return per_net[key]


def choose(net, method: str = "gradcam", feature_layer=None) -> EngineChoice:
    """Where ``method`` ("gradcam" or "gradcam_plus_plus") runs for ``net`` at ``feature_layer`` (None:
    the default layer): decided once (the branch built and its session opened, or the reason it cannot
    be), then read from the per-classifier table."""
    return _entry(net, method, feature_layer)[0]


def session(net, method: str = "gradcam", feature_layer=None):
    """The onnxruntime session of ``net.model`` plus the ``method`` branch (built once per layer)."""
    choice, run = _entry(net, method, feature_layer)
    if run is None:
        raise InvalidParameterError(f"{method}: the in-graph path cannot run at layer "
                                    f"{layer_key(net, feature_layer)!r}: {choice.reason}.")
    return run


def _chunk(net, k: int) -> int:
    """Images per session call: all of them unless the run budget (one image's forward, the gradient
    of K classes beside it) says fewer."""
    guard = getattr(net.ort, "guard", None)
    if guard is None:
        return 1 << 30
    try:
        return max(1, guard.max_batch(net.per_image_shape) // max(1, k))
    except Exception:  # no estimate for this graph: the whole call at once, as before
        return 1 << 30


def cam_maps(net, x: np.ndarray, targets, method: str = "gradcam", feature_layer=None,
             with_unaveraged: bool = False):
    """(N, K, h, w) float32 maps of model input ``x`` (N, ...) for ``targets`` (N, K) class indices;
    with ``with_unaveraged``, also (N, K): each map's peak of sum_c mean|g| |A|, for the library's
    refusal of maps at float32 noise level (``BaseCAM._refuse_degenerate``)."""
    targets = np.asarray(targets, np.int64)
    if targets.ndim == 1:
        targets = np.broadcast_to(targets[None], (len(x), len(targets)))
    run = session(net, method, feature_layer)
    # graphs that keep their exported batch: one image a call; others: every image in one call, unless
    # the run budget says fewer
    step = 1 if net.max_batch == 1 or len(x) == 1 else min(len(x), _chunk(net, targets.shape[1]))
    names = [SALIENCY, f"{SALIENCY}_unaveraged"]
    guard = getattr(net.ort, "guard", None)
    parts = []
    for i in range(0, len(x), step):
        batch = x[i:i + step]
        if guard is not None:
            guard.check(batch.shape)
        try:
            parts.append(run.run(names, {net.input.name: batch, TARGET: np.ascontiguousarray(targets[i:i + step])}))
        except Exception as exc:  # as the forward passes: a failed allocation or run is the library's error
            raise ort_error(exc, batch.shape) from None
    maps = np.concatenate([p[0] for p in parts])
    return (maps, np.concatenate([p[1] for p in parts])) if with_unaveraged else maps
