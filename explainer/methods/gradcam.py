"""Grad-CAM (Selvaraju et al. 2017) with MATLAB's ``gradCAM`` semantics, on the converted module.

A small base class in the style of pytorch-grad-cam: ``BaseCAM`` (a ``MapMethod``) captures the
feature layer's activations and the gradient of the reduction (class score) with respect to them; each
CAM variant overrides one method, ``channel_weights``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import DegenerateMapError, InvalidParameterError
from ..runtime.feature_layers import LayerChoice, default_feature_layer, gradcam_layers  # noqa: F401
from ..runtime.torch_engine import torch_engine
from ._common import MapMethod
from .registry import GRADIENT, LayerName, method

if TYPE_CHECKING:
    from ..runtime.classifier import Classifier


#: a CAM whose peak is below this fraction of its unaveraged gradient x activation is float32 noise
NOISE = 1e-6


class BaseCAM(MapMethod):
    """Class activation maps from one feature layer: ReLU(sum_c w_c A_c), w from ``channel_weights``;
    upsampled to the image (bicubic) and cut at 0."""

    where = "gradcam"  # the public function's name, for messages
    rectify = True

    def __init__(self, net, feature_layer=None, reduction_layer=None):
        super().__init__(net)
        self.engine = torch_engine(net)
        self.feature_layer, self.reduction_layer = gradcam_layers(net, feature_layer, reduction_layer)
        self.layout = net.layout(self.feature_layer)

    def channel_weights(self, activations, gradients):
        raise NotImplementedError

    def low_resolution(self, pixels: np.ndarray, indices: list[int]) -> np.ndarray:
        """(K, h, w) maps at the feature layer's resolution for one H x W x C image."""
        import torch

        # the image needs a gradient so that the graph is recorded (the weights are frozen)
        x = self.engine.tensor(pixels).permute(2, 0, 1)[None].repeat(len(indices), 1, 1, 1).requires_grad_(True)
        logits_name = self.net.layer(self.net.gradient_scores).name
        layers = [self.feature_layer] + ([self.reduction_layer] if self.reduction_layer != logits_name else [])
        with torch.enable_grad(), self.engine.capture(layers) as captured:
            out = self.engine.pixel_model(x)
            scores = captured[self.reduction_layer] if self.reduction_layer in captured else out
            scores = scores.reshape(len(indices), -1)
            if scores.shape[1] <= max(indices):
                raise InvalidParameterError(
                    f"gradcam: reduction_layer {self.reduction_layer!r} has {scores.shape[1]} channels; "
                    f"class {max(indices)} is out of range.")
            rows = torch.arange(len(indices), device=scores.device)
            target = scores[rows, torch.tensor(indices, device=scores.device)].sum()
            acts = captured[self.feature_layer]
            grads = captured.gradient(target, self.feature_layer)
        if self.layout is not None:  # tokens and channels-last grids, as pytorch-grad-cam's reshape_transform
            acts, grads = self.layout.to_chw(acts), self.layout.to_chw(grads)
        if acts.ndim != 4:
            raise InvalidParameterError(
                f"gradcam: feature_layer {self.feature_layer!r} has rank-{acts.ndim} activations; a "
                "(N, C, H, W) layer is needed.")
        acts, grads = acts.detach(), grads.detach()
        weights = self.channel_weights(acts, grads)
        cam = torch.relu((weights[:, :, None, None] * acts).sum(1))
        self._refuse_degenerate(cam, acts, grads, indices)
        return cam.cpu().numpy().astype(np.float32)

    def _refuse_degenerate(self, cam, acts, grads, indices) -> None:
        """A map with no signal is an error naming the layer, never a returned map: zero everywhere (no
        location raises the score), or at float32 noise level next to what the same activations and
        gradients give without the averaging that cancelled (on attention scores before their Softmax
        the gradient sums to zero over each row, and Grad-CAM's weights are rounding errors)."""
        scale = (grads.abs().mean(dim=(2, 3))[:, :, None, None] * acts.abs()).sum(1).flatten(1).amax(1).tolist()
        peak = cam.flatten(1).amax(1).tolist()
        for index, top, unaveraged in zip(indices, peak, scale):
            if unaveraged == 0.0:
                what = "the layer's activations or the score's gradient with respect to them are zero everywhere"
            elif top == 0.0:
                what = ("it is zero everywhere: at every location the weighted channels lower the class score "
                        "(the ReLU keeps none)")
            elif top <= NOISE * unaveraged:
                what = (f"its peak {top:.2e} is at float32 noise level ({top / unaveraged:.1e} of the layer's "
                        "unaveraged gradient x activation)")
            else:
                continue
            raise DegenerateMapError(
                f"{self.where}: the map of class {index} at layer {self.feature_layer!r} carries no signal: "
                f"{what}. Pick another feature_layer (gradcam_layers(net) gives the default and why), or "
                "another method (gradient, occlusion).")

    def explain(self, pixels, indices):
        return self.low_resolution(pixels, indices)


class GradCAM(BaseCAM):
    """Channel weights: the spatial mean of the score's gradient (Selvaraju et al.)."""

    def channel_weights(self, activations, gradients):
        return gradients.mean(dim=(2, 3))


LAYER_OPTIONS = dict(
    feature_layer=LayerName(help="the layer whose activations are weighted (default: gradcam_layers(net))"),
    reduction_layer=LayerName(help="the layer whose channel is the class score (default: the scores "
                                   "before any softmax)"))


@method("gradcam", kind=GRADIENT, options=LAYER_OPTIONS,
        answers="where in the image the evidence for the class lies, at the resolution of a feature layer "
                "(deep: coarse and class-specific; shallow: fine)",
        returns="maps at the image's size, >= 0, in the feature layer's units",
        cost="1 forward and 1 backward pass per image (all labels in one batch)",
        reference="pytorch-grad-cam's GradCAM on the converted module", order=10)
def gradcam(net: Classifier, image, label, *, feature_layer=None, reduction_layer=None):
    """Grad-CAM map(s) upsampled (bicubic) to the image size: (H, W) for one label, (K, H, W) for
    several; a batch of images gives one such map per image. ``gradcam_layers(net)`` tells the
    defaults and why; transformer tokens are laid out on their grid (``net.layout(layer)``)."""
    return GradCAM(net, feature_layer, reduction_layer)(image, label)
