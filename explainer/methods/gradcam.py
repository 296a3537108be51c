"""Grad-CAM (Selvaraju et al. 2017) with MATLAB's ``gradCAM`` semantics.

A small base class in the style of pytorch-grad-cam: ``BaseCAM`` (a ``MapMethod``) takes the feature
layer's activations and the gradient of the reduction (class score) with respect to them; each CAM
variant overrides one method, ``channel_weights`` (and names its in-graph twin, ``method``).

Two engines give the same maps (within float32 rounding): onnxruntime, running the library's graph with
the head (feature layer -> class scores) differentiated in it by explainer/export (the builders of
export/cams.py compute the same weights), one session call for all images and labels; and the converted
torch module (forward, then backward), for what the graph cannot carry: a head op without a gradient
rule, a reduction layer other than the class scores. ``gradcam_engine(net)`` says which runs and why,
decided once per classifier and layer. On int8 graphs the in-graph path's activations are onnxruntime's
own (the converted module rounds some of them one step apart).
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

from ..errors import DegenerateMapError, InvalidParameterError
from ..runtime.feature_layers import LayerChoice, default_feature_layer, gradcam_layers  # noqa: F401
from ..runtime.torch_engine import torch_engine
from ._common import MapMethod
from .registry import GRADIENT, LayerName, method, public

if TYPE_CHECKING:
    from ..runtime.classifier import Classifier


#: a CAM whose peak is below this fraction of its unaveraged gradient x activation is float32 noise
NOISE = 1e-6
#: where a CAM runs: "auto" (onnxruntime through the differentiated head where it can, else torch),
#: or one of them by name ("onnxruntime" refuses a head it cannot differentiate)
RUNS_ON = ("auto", "onnxruntime", "torch")


@public
def gradcam_engine(net: Classifier, feature_layer=None, reduction_layer=None, method: str = "gradcam"):
    """Where ``explainer.gradcam`` (``method="gradcam_plus_plus"``: Grad-CAM++) runs for these layers, and
    why: ``"onnxruntime"`` -- the head (feature layer -> class scores) differentiated in the graph, one
    session call for every image and label of a call -- wherever ``export_explained`` could write the
    map (every op of the head has a gradient rule); else ``"torch"``, forward and backward on the
    converted module, with the reason ("head op Selu has no gradient rule"; a ``reduction_layer`` other
    than the class scores). The answer (a str, with ``.reason`` and ``.describe()``) is decided once
    per classifier, method and layer."""
    if method not in ("gradcam", "gradcam_plus_plus"):
        raise InvalidParameterError(f"gradcam_engine: method must be 'gradcam' or 'gradcam_plus_plus'; got {method!r}.")
    feature, reduction = gradcam_layers(net, feature_layer, reduction_layer)
    return _engine(net, feature, reduction, method)


def _engine(net: Classifier, feature: str, reduction: str, method: str):
    """``gradcam_engine`` for checked layer names."""
    from ..export.engine import TORCH, EngineChoice, choose

    if reduction != net.layer(net.gradient_scores).name:
        return EngineChoice(TORCH, f"reduction_layer {reduction!r} is not the class scores, the only reduction "
                                   "the in-graph path differentiates")
    return choose(net, method, feature)


class BaseCAM(MapMethod):
    """Class activation maps from one feature layer: ReLU(sum_c w_c A_c), w from ``channel_weights``;
    upsampled to the image (bicubic) and cut at 0. They run on onnxruntime through the differentiated
    head where ``gradcam_engine`` says so (the same weights, written as a graph: explainer/export/cams.py),
    else on the converted module (``runs_on="torch"`` forces that path, for checks)."""

    where = "gradcam"  # the public function's name, for messages
    method = "gradcam"  # the in-graph builder of the same CAM (explainer/export/cams.py)
    rectify = True

    def __init__(self, net, feature_layer=None, reduction_layer=None, runs_on: str = "auto"):
        super().__init__(net)
        if runs_on not in RUNS_ON:
            raise InvalidParameterError(f"{self.where}: runs_on must be one of {RUNS_ON}; got {runs_on!r}.")
        self.feature_layer, self.reduction_layer = gradcam_layers(net, feature_layer, reduction_layer)
        if runs_on == "torch":
            from ..export.engine import TORCH, EngineChoice

            self.runs_on = EngineChoice(TORCH, "asked for")
        else:  # gradcam_engine's answer, without checking the layers a second time
            self.runs_on = _engine(net, self.feature_layer, self.reduction_layer, self.method)
            if runs_on == "onnxruntime" and not self.runs_on.in_graph:
                raise InvalidParameterError(f"{self.where}: the in-graph path cannot run at layer "
                                            f"{self.feature_layer!r}: {self.runs_on.reason}.")

    @functools.cached_property
    def layout(self):
        """How the feature layer lays out (C, H, W) (tokens, channels-last grids): for the torch path
        (the in-graph path writes it in the graph)."""
        return self.net.layout(self.feature_layer)

    @property
    def engine(self):
        """The converted module's engine (converted and checked on first use: the in-graph path never
        needs it)."""
        return torch_engine(self.net)

    def channel_weights(self, activations, gradients):
        raise NotImplementedError

    def low_resolution(self, pixels: np.ndarray, indices: list[int]) -> np.ndarray:
        """(K, h, w) maps at the feature layer's resolution for one H x W x C image."""
        if self.runs_on.in_graph:
            return self._in_graph([pixels], indices)[0]
        return self._torch(pixels, indices)

    def _in_graph(self, pixels: list[np.ndarray], indices: list[int]) -> np.ndarray:
        """(N, K, h, w) maps of every image, one onnxruntime call (explainer/export/engine.py)."""
        from ..export.engine import pixel_cam_maps

        # the session normalises the pixels itself where it can (net.to_model_input's operations)
        maps, unaveraged = pixel_cam_maps(self.net, np.stack([self.net.fit_pixels(p) for p in pixels]),
                                          np.asarray(indices, np.int64), self.method, self.feature_layer,
                                          with_unaveraged=True)
        for m, scale in zip(maps, unaveraged):
            self._refuse_degenerate(m.reshape(len(indices), -1).max(axis=1).tolist(), scale.tolist(), indices)
        return maps.astype(np.float32, copy=False)

    def _torch(self, pixels: np.ndarray, indices: list[int]) -> np.ndarray:
        """(K, h, w) maps of one image from a forward and a backward pass of the converted module."""
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
        # the peak of each map, and what the same activations and gradients give without the averaging
        scale = (grads.abs().mean(dim=(2, 3))[:, :, None, None] * acts.abs()).sum(1).flatten(1).amax(1).tolist()
        self._refuse_degenerate(cam.flatten(1).amax(1).tolist(), scale, indices)
        return cam.cpu().numpy().astype(np.float32)

    def _refuse_degenerate(self, peak: list[float], scale: list[float], indices) -> None:
        """A map with no signal is an error naming the layer, never a returned map: zero everywhere (no
        location raises the score), or at float32 noise level next to what the same activations and
        gradients give without the averaging that cancelled (``scale``: the peak of sum_c mean|g| |A|;
        on attention scores before their Softmax the gradient sums to zero over each row, and Grad-CAM's
        weights are rounding errors)."""
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

    def sized(self, m: np.ndarray, pixels: np.ndarray, indices: list[int]) -> np.ndarray:
        """The maps at the image's size (the library's bicubic, as ``MapMethod.sized``), cut at 0: PIL's
        separable filter as two products with its coefficient matrices, kept per size
        (``export.resize.upsample``)."""
        from ..export.resize import upsample

        return np.maximum(upsample(m, pixels.shape[:2]), 0.0)

    def explain_all(self, pixels, indices):
        if self.runs_on.in_graph:  # every image and label of the call through one session call
            return list(self._in_graph(pixels, indices))
        return super().explain_all(pixels, indices)


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
        cost="one onnxruntime call for all images and labels, through the head differentiated in the graph "
             "(explainer.gradcam_engine says where; else 1 forward and 1 backward pass of the converted module)",
        reference="pytorch-grad-cam's GradCAM on the converted module (both engines)", order=10)
def gradcam(net: Classifier, image, label, *, feature_layer=None, reduction_layer=None):
    """Grad-CAM map(s) upsampled (bicubic) to the image size: (H, W) for one label, (K, H, W) for
    several; a batch of images gives one such map per image. ``gradcam_layers(net)`` tells the
    defaults and why; transformer tokens are laid out on their grid (``net.layout(layer)``)."""
    return GradCAM(net, feature_layer, reduction_layer)(image, label)
