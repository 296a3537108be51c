"""A chance baseline: maps that know nothing about the image. A method's deletion and insertion AUC
mean little alone; they should beat a random map's (``evaluate.random_map_auc`` averages several).
Folder and dataset audits list it beside the methods (``--methods gradcam,random``)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ._common import finish, images_and_labels, resize_map
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
        reference="numpy's generator drawn in the same order (test)")
def random_map(net: Classifier, image, label, *, cells=None, random_state=None):
    """Random map(s): (H, W) for one label, (K, H, W) for several (one independent map per label)."""
    pixels, is_batch, indices, several = images_and_labels(net, image, label, "random")
    rng = np.random.default_rng(random_state)
    maps = []
    for p in pixels:
        h, w = p.shape[:2]
        if cells is None:
            maps.append(rng.random((len(indices), h, w)).astype(np.float32))
        else:
            maps.append(resize_map(rng.random((len(indices), cells, cells)).astype(np.float32), (h, w)))
    return finish(maps, is_batch, several, "random")
