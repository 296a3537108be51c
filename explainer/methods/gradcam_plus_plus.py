"""Grad-CAM++ (Chattopadhay et al. 2018): Grad-CAM whose channel weights count every positive gradient
location, each weighted by the closed-form alpha of the paper's eq. 19 (an exponential of the score
assumed), so that several instances of a class each light up."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .gradcam import BaseCAM, LAYER_OPTIONS
from .registry import GRADIENT, method

if TYPE_CHECKING:
    from ..runtime.classifier import Classifier


class GradCAMPlusPlus(BaseCAM):
    """Channel weights sum_ij alpha_ij ReLU(g_ij), alpha_ij = g_ij^2 / (2 g_ij^2 + g_ij^3 sum_ab A_ab)."""

    where = "gradcam_plus_plus"
    method = "gradcam_plus_plus"

    def channel_weights(self, activations, gradients):
        import torch

        g2 = gradients ** 2
        total = activations.sum(dim=(2, 3), keepdim=True)
        alpha = g2 / (2 * g2 + total * g2 * gradients + 1e-6)
        alpha = torch.where(gradients != 0, alpha, torch.zeros_like(alpha))
        return (gradients.clamp(min=0) * alpha).sum(dim=(2, 3))


@method("gradcam_plus_plus", kind=GRADIENT, options=LAYER_OPTIONS,
        answers="where the evidence for the class lies, counting every region that raises the score "
                "(several objects of one class each show)",
        returns="maps at the image's size, >= 0, in the feature layer's units",
        cost="one onnxruntime call for all images and labels, through the head differentiated in the graph "
             "(explainer.gradcam_engine says where; else 1 forward and 1 backward pass of the converted module)",
        reference="pytorch-grad-cam's GradCAMPlusPlus on the converted module (both engines)", order=20)
def gradcam_plus_plus(net: Classifier, image, label, *, feature_layer=None, reduction_layer=None):
    """Grad-CAM++ map(s): (H, W) for one label, (K, H, W) for several, at the image's size; layers as
    in ``gradcam``."""
    return GradCAMPlusPlus(net, feature_layer, reduction_layer)(image, label)
