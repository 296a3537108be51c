"""Plain gradients (MATLAB's ``gradientAttribution`` with "autodiff", Simonyan et al. 2014): how much a
small change of each pixel changes the class score."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ._gradients import class_gradients, gradient_maps
from .registry import GRADIENT, method

if TYPE_CHECKING:
    from ..runtime.classifier import Classifier


def raw(engine, x, indices):
    """d score / d pixel, (K, C, H, W) for one image x (1, C, H, W) and K class indices."""
    return class_gradients(engine, x.repeat(len(indices), 1, 1, 1), indices, guided=False)


@method("gradient", kind=GRADIENT, options={}, aliases=("autodiff", "saliency"),
        answers="which pixels, changed a little, would change the class score most",
        returns="maps at the image's size in [0, 1]: the sum over channels of |d score / d pixel|, rescaled "
                "per map",
        cost="1 forward and 1 backward pass per image (all labels in one batch)",
        reference="Captum's Saliency on the converted module", order=80)
def saliency(net: Classifier, image, label):
    """Gradient map(s): (H, W) for one label, (K, H, W) for several, at the image's size."""
    return gradient_maps(net, image, label, "gradient", raw)
