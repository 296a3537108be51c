"""The feature layer a class activation map reads: ``default_feature_layer`` (the last feature map the
class score depends on, or on class-token transformers the last norm before the last attention) and
``gradcam_layers`` (the (feature, reduction) pair with the reason), shared by the CAM methods
(explainer/methods) and the graphs that carry them (explainer/export); and ``location_masks``, the
masks on a feature grid that Recipro-CAM runs its head on (the library's method and the exported graph).
Below both, so that neither imports the other for them."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import InvalidParameterError
from ..graph import reads
from .classifier import not_a_feature_map

if TYPE_CHECKING:
    from .classifier import Classifier


class LayerChoice(tuple):
    """(feature layer, reduction layer) as a pair, with ``reason``: why the feature layer was taken."""

    def __new__(cls, feature: str, reduction: str, reason: str):
        pair = super().__new__(cls, (feature, reduction))
        pair.reason = reason
        return pair

    @property
    def feature(self) -> str:
        return self[0]

    @property
    def reduction(self) -> str:
        return self[1]


def _ancestors(graph, tensor: str) -> set[str]:
    needed = {tensor}
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            needed.update(i for i in reads(node) if i)
    return needed


_INTEGER_VALUED = ("QuantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger")


def default_feature_layer(net: Classifier) -> tuple[str, str]:
    """(layer name, why): the last feature map the class score depends on, whatever the activation:
    on CNNs the last (C, H, W) map before the global pooling; on transformers pooling the mean of their
    tokens (Swin, LeViT) the last token grid; on transformers reading class tokens (ViT, DeiT), whose
    patch tokens reach the score only through attention, the output of the last norm before the last
    attention (pytorch-grad-cam's ``blocks[-1].norm1``). Found once per classifier (``net.runtime``)."""
    if net.runtime.default_feature_layer is None:
        net.runtime.default_feature_layer = _default_feature_layer(net)
    return net.runtime.default_feature_layer


def _default_feature_layer(net: Classifier) -> tuple[str, str]:
    scores = net.gradient_scores
    ancestors = _ancestors(net.model.graph, scores)
    layers = net.layers()
    # quantized graphs: the integers QuantizeLinear makes are not activations; their dequantized
    # values (DequantizeLinear's output) are, with gradients through the straight-through estimator
    reached = net.structure.image_dependent
    candidates = [(i, l, net.layout(l)) for i, l in enumerate(layers)
                  if l.output in ancestors and l.output in reached and l.op_type not in _INTEGER_VALUED]
    candidates = [(i, l, lay) for i, l, lay in candidates if lay is not None]
    if not candidates:
        raise InvalidParameterError(
            "gradcam: the class score depends on no layer with spatial dimensions (a (C, H, W) map, "
            "tokens on the image's grid or an (H, W, C) grid); pass feature_layer= (net.layers() lists "
            "the layers).")
    index, last, layout = candidates[-1]
    if layout.kind != "tokens" or layout.prefix == 0:
        what = last.op_type
        if last.op_type == "DequantizeLinear":
            what = "DequantizeLinear (the layer's int8 activations as real values)"
        return last.name, f"the last layer the score depends on with spatial extent: {what}, {layout.describe()}"
    # attention over all tokens: self-attention (T x T) or class attention (1 x T: CaiT, XCiT)
    attention = [i for i, l in enumerate(layers) if l.op_type == "Softmax" and l.shape and len(l.shape) >= 2
                 and l.shape[-1] == layout.prefix + layout.grid[0] * layout.grid[1]]
    if not attention:  # attention over another axis (CoaT's factorised attention: the keys' softmax over the
        # tokens, axis -2) or over fewer keys (CvT's strided keys and values): any softmax of two or more
        # axes an image that the score depends on (without it, the last token layer: CoaT's and CvT's final
        # norm, whose patch tokens the class-token head never reads, gave an all-zero map)
        attention = [i for i, l in enumerate(layers) if l.op_type == "Softmax" and l.shape and len(l.shape) >= 2
                     and l.output in ancestors and l.output in reached]
    before = [(i, l, lay) for i, l, lay in candidates if attention and i < attention[-1]]
    norms = [c for c in before if c[1].output in net.structure.norms] or before
    if not norms:
        return last.name, f"the last token layer the score depends on: {layout.describe()}"
    _, chosen, chosen_layout = norms[-1]
    what = "layer norm" if chosen.output in net.structure.norms else chosen.op_type
    return chosen.name, (f"the score reads the class token, which patch tokens reach only through "
                         f"attention: the last {what} before the last attention, "
                         f"{chosen_layout.describe()}")


def gradcam_layers(net: Classifier, feature_layer=None, reduction_layer=None) -> LayerChoice:
    """The (feature, reduction) layer names Grad-CAM uses, with ``.reason`` saying why. Defaults: the
    feature layer of ``default_feature_layer``; the reduction is the class score before any trailing
    Softmax."""
    if feature_layer is None:
        feature_layer, reason = default_feature_layer(net)
    else:
        layer = net.layer(feature_layer)
        layout = net.feature_map_layout(layer, "gradcam")
        if layout is None and layer.shape is not None:
            raise InvalidParameterError(not_a_feature_map("gradcam: feature_layer needs spatial dimensions", layer))
        reason = "given" if layout is None else f"given: {layout.describe()}"
    if reduction_layer is None:
        reduction_layer = net.gradient_scores
        reduction_layer = net.layer(reduction_layer).name
    else:
        net.layer(reduction_layer)
    return LayerChoice(feature_layer, reduction_layer, reason)


#: OpenVINO XAI's ViTReciproCAM kernel (and the authors' ``gaussian`` option)
GAUSSIAN = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float32) / 16


def location_masks(grid: tuple[int, int], kernel: str) -> np.ndarray:
    """(h*w, h, w) float32: mask ``k = i * w + j`` keeps location (i, j) ("point") or its 3 x 3
    neighbourhood weighted by ``GAUSSIAN`` ("gaussian"), zero elsewhere."""
    h, w = grid
    k = np.arange(h * w)
    if kernel == "point":
        out = np.zeros((h * w, h, w), np.float32)
        out[k, k // w, k % w] = 1.0
        return out
    padded = np.zeros((h * w, h + 2, w + 2), np.float32)
    for index in range(h * w):
        i, j = divmod(index, w)
        padded[index, i:i + 3, j:j + 3] = GAUSSIAN
    return np.ascontiguousarray(padded[:, 1:-1, 1:-1])
