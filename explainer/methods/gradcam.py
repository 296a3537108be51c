"""Grad-CAM (Selvaraju et al. 2017) with MATLAB's ``gradCAM`` semantics, on the converted module.

A small base class in the style of pytorch-grad-cam: ``BaseCAM`` captures the feature layer's
activations and the gradient of the reduction (class score) with respect to them; each CAM variant
overrides one method, ``channel_weights``.
"""
from __future__ import annotations

import numpy as np

from ..errors import InvalidParameterError
from ..model.graph import clip_bound
from ..model.torch_engine import torch_engine
from ._common import finish, images_and_labels, resize_map

RELU_OPS = ("Relu",)
GATHER_OPS = ("Concat", "Add", "Sum")


def _is_relu(net, layer) -> bool:
    if layer.op_type in RELU_OPS:
        return True
    if layer.op_type == "Clip":  # ReLU6 and friends: Clip with min 0
        node = next(n for n in net.model.graph.node if n.output and n.output[0] == layer.output)
        low = clip_bound(net.model.graph, node, "min")
        return low is not None and low == 0.0
    return False


def gradcam_layers(net, feature_layer=None, reduction_layer=None) -> tuple[str, str]:
    """The (feature, reduction) layer names Grad-CAM uses. Defaults, as MATLAB's: the last ReLU with
    non-singleton spatial dimensions, or a later layer gathering ReLU outputs (Concat, Add); the
    reduction is the class score before any trailing Softmax."""
    if feature_layer is None:
        layers = net.layers()
        producers = {n.output[0]: n for n in net.model.graph.node if n.output}
        relu_outputs = {l.output for l in layers if _is_relu(net, l)}
        chosen = None
        for layer in layers:
            spatial = layer.shape is not None and len(layer.shape) == 3 and \
                all(d is not None and d > 1 for d in layer.shape[1:])
            if not spatial:
                continue
            if layer.output in relu_outputs:
                chosen = layer
            elif layer.op_type in GATHER_OPS:
                node = producers[layer.output]
                if any(_feeds_from_relu(i, producers, relu_outputs) for i in node.input):
                    chosen = layer
        if chosen is None:
            raise InvalidParameterError(
                "gradcam: no ReLU or ReLU-gathering layer with spatial dimensions found; pass "
                "feature_layer= (net.layers() lists the candidates).")
        feature_layer = chosen.name
    else:
        layer = net.layer(feature_layer)
        if layer.shape is not None and (len(layer.shape) != 3 or layer.shape[1] == 1 and layer.shape[2] == 1):
            raise InvalidParameterError(
                f"gradcam: feature_layer {feature_layer!r} has output shape {layer.shape} per image; "
                "Grad-CAM needs a layer with spatial dimensions (C, H, W) larger than 1x1.")
    if reduction_layer is None:
        reduction_layer = net.output.softmax_input or net.output.name
        reduction_layer = net.layer(reduction_layer).name
    else:
        net.layer(reduction_layer)
    return feature_layer, reduction_layer


def _feeds_from_relu(name, producers, relu_outputs, depth=0) -> bool:
    """Whether tensor ``name`` is a ReLU output, possibly through pooling or another gathering op."""
    if name in relu_outputs:
        return True
    node = producers.get(name)
    if node is None or depth > 4 or node.op_type not in ("MaxPool", "AveragePool", *GATHER_OPS):
        return False
    return any(_feeds_from_relu(i, producers, relu_outputs, depth + 1) for i in node.input)


class BaseCAM:
    """Class activation maps from one feature layer: ReLU(sum_c w_c A_c), w from ``channel_weights``."""

    def __init__(self, net, feature_layer=None, reduction_layer=None):
        self.net = net
        self.engine = torch_engine(net)
        self.feature_layer, self.reduction_layer = gradcam_layers(net, feature_layer, reduction_layer)

    def channel_weights(self, activations, gradients):
        raise NotImplementedError

    def low_resolution(self, pixels: np.ndarray, indices: list[int]) -> np.ndarray:
        """(K, h, w) maps at the feature layer's resolution for one H x W x C image."""
        import torch

        # the image needs a gradient so that the graph is recorded (the weights are frozen)
        x = self.engine.tensor(pixels).permute(2, 0, 1)[None].repeat(len(indices), 1, 1, 1).requires_grad_(True)
        logits_name = self.net.layer(self.net.output.softmax_input or self.net.output.name).name
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
            if acts.ndim != 4:
                raise InvalidParameterError(
                    f"gradcam: feature_layer {self.feature_layer!r} has rank-{acts.ndim} activations; a "
                    "(N, C, H, W) layer is needed.")
            grads = torch.autograd.grad(target, acts)[0]
        weights = self.channel_weights(acts.detach(), grads.detach())
        cam = torch.relu((weights[:, :, None, None] * acts.detach()).sum(1))
        return cam.cpu().numpy().astype(np.float32)

    def __call__(self, image, label):
        pixels, is_batch, indices, several = images_and_labels(self.net, image, label, "gradcam")
        maps = []
        for p in pixels:
            low = self.low_resolution(p, indices)
            maps.append(np.maximum(resize_map(low, p.shape[:2]), 0.0))
        return finish(maps, is_batch, several, "gradcam")


class GradCAM(BaseCAM):
    """Channel weights: the spatial mean of the score's gradient (Selvaraju et al.)."""

    def channel_weights(self, activations, gradients):
        return gradients.mean(dim=(2, 3))


class GradCAMPlusPlus(BaseCAM):
    """Channel weights of Grad-CAM++ (Chattopadhay et al. 2018), exponential-score closed form."""

    def channel_weights(self, activations, gradients):
        g2, g3 = gradients ** 2, gradients ** 3
        denom = 2 * g2 + (activations * g3).sum(dim=(2, 3), keepdim=True)
        alpha = g2 / denom.where(denom != 0, denom.new_ones(()))
        return (alpha * gradients.clamp(min=0)).sum(dim=(2, 3))


def gradcam(net, image, label, *, feature_layer=None, reduction_layer=None):
    """Grad-CAM map(s) upsampled (bicubic) to the image size: (H, W) for one label, (K, H, W) for
    several; a batch of images gives one such map per image. ``gradcam_layers(net)`` tells the
    defaults."""
    return GradCAM(net, feature_layer, reduction_layer)(image, label)
