"""Grad-CAM maps computed by onnxruntime through the differentiated head: the library's in-graph path
(issue 27, point 5). ``cam_maps(net, x, targets)`` runs one session of the library's normalised graph
(``net.model``: any batch) with the explanation branch of ``build_explained`` and a (N, K) ``target``
input, and returns (N, K, h, w) maps at the feature layer's resolution, as ``BaseCAM.low_resolution``
does for each image. The sessions are kept per classifier (weakly: they go with it)."""
from __future__ import annotations

import weakref

import numpy as np

from .writer import SALIENCY, TARGET, build_explained

_SESSIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def session(net, method: str = "gradcam", feature_layer=None):
    """The onnxruntime session of ``net.model`` plus the ``method`` branch (built once per layer)."""
    import onnxruntime as ort

    per_net = _SESSIONS.setdefault(net, {})
    key = (method, feature_layer)
    if key not in per_net:
        model = build_explained(net, method, feature_layer, 0, "feature", source=net.model, targets_per_image=True,
                                diagnostics=True, where=method)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        providers = list(getattr(net.ort, "providers", None) or ["CPUExecutionProvider"])
        per_net[key] = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    return per_net[key]


def cam_maps(net, x: np.ndarray, targets, method: str = "gradcam", feature_layer=None,
             with_unaveraged: bool = False):
    """(N, K, h, w) float32 maps of model input ``x`` (N, ...) for ``targets`` (N, K) class indices;
    with ``with_unaveraged``, also (N, K): each map's peak of sum_c mean|g| |A|, for the library's
    refusal of maps at float32 noise level (``BaseCAM._refuse_degenerate``)."""
    targets = np.asarray(targets, np.int64)
    if targets.ndim == 1:
        targets = np.broadcast_to(targets[None], (len(x), len(targets)))
    run = session(net, method, feature_layer)
    step = 1 if net.max_batch == 1 else len(x)  # graphs that keep their exported batch: one image a call
    names = [SALIENCY, f"{SALIENCY}_unaveraged"]
    parts = [run.run(names, {net.input.name: x[i:i + step], TARGET: np.ascontiguousarray(targets[i:i + step])})
             for i in range(0, len(x), step)]
    maps = np.concatenate([p[0] for p in parts])
    return (maps, np.concatenate([p[1] for p in parts])) if with_unaveraged else maps
