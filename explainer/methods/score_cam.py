"""Score-CAM (Wang et al. 2020): a CAM without gradients. Each channel of the feature layer, upsampled
and scaled to [0, 1], masks the image; the class score of each masked image, softmaxed over the
channels, weights its channel. Forward passes only, on onnxruntime: it works on every graph
onnxruntime runs, converted or not, and its masked images stream through the shared batching loop.

As pytorch-grad-cam's ``ScoreCAM``: bilinear upsampling with aligned corners, per-channel min-max
scaling (+1e-8), the masks multiply the pixels, the scores are the pre-softmax class scores (for a
graph that outputs only probabilities: their logarithm, which differs from logits by a constant per
image), and the map is ReLU(sum_c w_c A_c).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ._common import MapMethod
from ..runtime.perturb import BACKENDS, stream_probabilities
from ..runtime.feature_layers import default_feature_layer
from .registry import FORWARD_ONLY, BatchSize, Choice, Flag, LayerName, method

if TYPE_CHECKING:
    from ..runtime.classifier import Classifier


def _bilinear_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) weights of bilinear interpolation with aligned corners along one axis."""
    src = np.arange(n_out) * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(1)
    low = np.minimum(np.floor(src).astype(int), n_in - 1)
    high = np.minimum(low + 1, n_in - 1)
    frac = src - low
    out = np.zeros((n_out, n_in))
    np.add.at(out, (np.arange(n_out), low), 1 - frac)
    np.add.at(out, (np.arange(n_out), high), frac)
    return out.astype(np.float32)


def channel_masks(activations: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(C, H, W) masks: each channel of (C, h, w) ``activations`` upsampled bilinearly with aligned
    corners (torch's ``UpsamplingBilinear2d``) to ``size`` and scaled to [0, 1]."""
    rows, cols = _bilinear_matrix(size[0], activations.shape[1]), _bilinear_matrix(size[1], activations.shape[2])
    up = rows @ activations.astype(np.float32) @ cols.T
    low = up.min(axis=(1, 2), keepdims=True)
    high = up.max(axis=(1, 2), keepdims=True)
    return (up - low) / (high - low + 1e-8)


@method("score_cam", kind=FORWARD_ONLY,
        options=dict(feature_layer=LayerName(help="the layer whose channels mask the image (default: "
                                                   "Grad-CAM's default layer)"),
                     batch_size=BatchSize(), backend=Choice(BACKENDS), verbose=Flag()),
        answers="which of the layer's channel patterns, shown alone, raise the class score most, and where "
                "they lie",
        returns="maps at the image's size, >= 0, in the feature layer's units",
        cost="one forward pass per channel of the feature layer (all labels share them)",
        reference="pytorch-grad-cam's ScoreCAM on the converted module", order=30)
def score_cam(net: Classifier, image, label, *, feature_layer=None, batch_size="auto", backend="onnxruntime", verbose=True):
    """Score-CAM map(s): (H, W) for one label, (K, H, W) for several, at the image's size."""
    return ScoreCAM(net, feature_layer, batch_size, backend, verbose)(image, label)


class ScoreCAM(MapMethod):
    where, rectify = "score_cam", True

    def __init__(self, net: Classifier, feature_layer, batch_size, backend, verbose):
        super().__init__(net, backend=backend, verbose=verbose)
        self.layer = net.layer(feature_layer if feature_layer is not None else default_feature_layer(net)[0])
        net.feature_map_layout(self.layer, self.where)  # refuses tensors that are not feature maps
        self.batch = net.resolve_batch_size(batch_size, self.where, backend)

    def explain(self, pixels, indices):
        return low_resolution(self.net, self.net.fit_pixels(pixels), self.layer, indices, self.batch, self.backend,
                              self.verbose)


def low_resolution(net: Classifier, small: np.ndarray, layer, indices, batch: int, backend: str = "onnxruntime",
                   verbose: bool = False) -> np.ndarray:
    """(K, h, w) Score-CAM maps at the layer's resolution for one network-size image (0..255 pixels)."""
    layout = net.layout(layer)
    acts = net.ort.run(net.to_model_input(small[None]), [layer.output])[0].astype(np.float32)
    if layout is not None:
        acts = np.ascontiguousarray(layout.to_chw(acts))
    acts = acts[0]
    scores = np.empty((len(acts), len(indices)), np.float64)

    def make_batch(start, stop):  # the masks of one batch of channels at a time: memory stays flat
        return net.to_model_input(small[None] * channel_masks(acts[start:stop], net.input.size)[..., None])

    for start, stop, s in stream_probabilities(net, make_batch, len(acts), batch_size=batch, backend=backend,
                                               verbose=verbose, desc="Score-CAM", logits=True):
        scores[start:stop] = s[:, indices]
    weights = np.exp(scores - scores.max(axis=0))
    weights /= weights.sum(axis=0)  # softmax over the channels, per label
    return np.maximum(np.einsum("ck,chw->khw", weights, acts.astype(np.float64)), 0).astype(np.float32)
