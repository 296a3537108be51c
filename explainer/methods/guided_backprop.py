"""Guided backpropagation (Springenberg et al. 2015): gradients whose negative parts are stopped at
every ReLU on the way back, so that only what excites the class shows."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ._gradients import class_gradients, gradient_maps
from .registry import GRADIENT, method

if TYPE_CHECKING:
    from ..runtime.classifier import Classifier


def raw(engine, x, indices):
    """Guided gradients, (K, C, H, W) for one image x (1, C, H, W) and K class indices."""
    return class_gradients(engine, x.repeat(len(indices), 1, 1, 1), indices, guided=True)


@method("guided_backprop", kind=GRADIENT, options={}, aliases=("guided-backprop",),
        answers="which pixel patterns excite the class (fine detail; weakly class-specific)",
        returns="maps at the image's size in [0, 1]: the sum over channels of |guided gradient|, rescaled per map",
        cost="1 forward and 1 backward pass per image (all labels in one batch)",
        reference="Captum's GuidedBackprop on the converted module", order=90)
def guided_backprop(net: Classifier, image, label):
    """Guided-backpropagation map(s): (H, W) for one label, (K, H, W) for several, at the image's size."""
    return gradient_maps(net, image, label, "guided_backprop", raw)
