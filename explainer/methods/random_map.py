"""A chance baseline: maps that know nothing about the image. A method's deletion and insertion AUC
mean little alone; they should beat a random map's (``evaluate.random_map_auc`` averages several).
Folder and dataset audits list it beside the methods (``--methods gradcam,random``)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ._common import MapMethod
from .registry import FORWARD_ONLY, Int, Optional, Seed, method

if TYPE_CHECKING:
    from ..runtime.classifier import Classifier


@method("random", kind=FORWARD_ONLY,
        options=dict(cells=Optional(Int(minimum=1, maximum=4096),
                                    help="None: uniform noise per pixel; n: an n x n grid of uniform values "
                                         "upsampled (bicubic), as smooth as coarse maps such as Grad-CAM's"),
                     random_state=Seed()),
        answers="what a map that knows nothing scores: the chance level of faithfulness metrics",
        returns="maps at the image's size: uniform values in [0, 1) per pixel, or a smooth grid of them",
        cost="no forward pass",
        reference="numpy's generator drawn in the same order (test)", order=150)
def random_map(net: Classifier, image, label, *, cells=None, random_state=None):
    """Random map(s): (H, W) for one label, (K, H, W) for several (one independent map per label)."""
    return RandomMap(net, cells=cells, random_state=random_state)(image, label)


class RandomMap(MapMethod):
    where = "random"

    def setup(self, pixels, indices):  # one generator, drawn image after image
        self.rng = np.random.default_rng(self.random_state)

    def explain(self, pixels, indices):  # per pixel, or a cells x cells grid upsampled by the base
        size = pixels.shape[:2] if self.cells is None else (self.cells, self.cells)
        return self.rng.random((len(indices), *size)).astype(np.float32)
