"""What every method does before and after its own work: images in, labels resolved, maps out.

``MapMethod`` is the base of the methods that answer maps: it owns that plumbing once (as
pytorch-grad-cam's ``BaseCAM`` and Captum's ``attribute()`` own theirs), and a method's file keeps only
its idea, ``explain`` (one image) or ``explain_all`` (all the images of a call at once)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import InvalidParameterError, NonFiniteOutputError
from ..io import to_pixel_batch
from ..model.preprocess import resize_map

if TYPE_CHECKING:
    from ..runtime.classifier import Classifier


def images_and_labels(net: Classifier, image, label, where: str):
    """(list of canonical H x W x C pixel arrays, whether a batch was given, class indices, several?)"""
    pixels, is_batch = to_pixel_batch(image)
    indices, several = net.class_indices(label, f"{where}: label")
    return pixels, is_batch, indices, several


def one_image(net: Classifier, image, label, where: str, name: str = ""):
    """(the canonical H x W x C pixels, class indices) of a function that takes one image, not a batch
    (``name``: the function, where ``where`` names its method)."""
    pixels, is_batch, indices, _ = images_and_labels(net, image, label, where)
    if is_batch:
        raise InvalidParameterError(f"{where}: {name + ' ' if name else ''}takes one image; got a batch.")
    return pixels[0], indices


def with_batch(net: Classifier, options: dict, where: str) -> dict:
    """The options with ``batch_size`` resolved for their ``backend`` ('auto': measured once per model)
    as ``batch``, for methods whose forward passes stream through ``runtime.perturb``."""
    options = dict(options)
    options["batch"] = net.resolve_batch_size(options.pop("batch_size"), where, options["backend"])
    return options


def class_scores(scores, indices: list[int], where: str):
    """Row b's score of class ``indices[b]`` from (B, K) torch scores (one row per label), or
    ``InvalidParameterError`` for a class beyond the K scores."""
    import torch

    if scores.shape[1] <= max(indices):
        raise InvalidParameterError(f"{where}: class {max(indices)} is out of range ({scores.shape[1]}).")
    return scores[torch.arange(len(indices), device=scores.device), torch.as_tensor(indices, device=scores.device)]


def rescale(m: np.ndarray) -> np.ndarray:
    """Each (H, W) map linearly to [0, 1] (MATLAB's rescale); constant maps become zeros."""
    out = np.zeros_like(m, dtype=np.float32)
    for idx in np.ndindex(m.shape[:-2]):
        lo, hi = float(m[idx].min()), float(m[idx].max())
        if hi > lo:
            out[idx] = (m[idx] - lo) / (hi - lo)
    return out


def finish(maps: list[np.ndarray], is_batch: bool, several: bool, method: str):
    """Per-image (K, H, W) maps → the public shape: (H, W), (K, H, W), or stacked/listed per image."""
    for m in maps:
        if not np.all(np.isfinite(m)):
            raise NonFiniteOutputError(f"{method}: the map contains NaN or infinite values; the model's "
                                       "scores or gradients are not finite for this image.")
    out = [np.ascontiguousarray(m if several else m[0], dtype=np.float32) for m in maps]
    if not is_batch:
        return out[0]
    if len({m.shape for m in out}) == 1:
        return np.stack(out)
    return out


class MapMethod:
    """One call of a method that answers maps: the images and labels resolved, each image explained
    (``explain``: its (K, h, w) maps) or all at once (``explain_all``), each map brought to its image's
    size, and the maps to the public shape (``finish``: (H, W) for one label, (K, H, W) for several,
    stacked or listed per image of a batch; non-finite values refused)::

        class Rise(MapMethod):
            where = "rise"

            def explain(self, pixels, indices):  # one H x W x C image (0..255), K class indices
                return ...                       # (K, h, w): resized to H x W by the base

        def rise(net, image, label, *, num_masks=2000, ...):
            return Rise(net, num_masks=num_masks, ...)(image, label)

    The keyword arguments of the constructor become attributes (``self.num_masks``; all of them in
    ``self.options``). Work before the images are read (checks against the network, the batch size)
    goes in ``__init__``; work shared by the images of one call, once they are read, in ``setup``.
    Progress bars stay with the work they count (the forward passes of one image)."""

    where = ""  # the public function's name, for messages
    upsample = True  # maps smaller than their image are resized to it (bicubic); False: explain sizes them
    rectify = False  # values below 0 (a bicubic resize's overshoot) are cut: maps that are >= 0 stay so
    class_agnostic = False  # one map per image, the same for every label: repeated once per label

    def __init__(self, net: Classifier, **options):
        self.net = net
        self.options = options
        for name, value in options.items():
            setattr(self, name, value)

    def setup(self, pixels: list[np.ndarray], indices: list[int]) -> None:
        """Work shared by the images of one call, after they and the labels are resolved."""

    def explain(self, pixels: np.ndarray, indices: list[int]) -> np.ndarray:
        """(K, h, w) maps of one canonical image (H x W x C pixels, 0..255) for K class indices ((1, h, w)
        for a class-agnostic method)."""
        raise NotImplementedError

    def explain_all(self, pixels: list[np.ndarray], indices: list[int]):
        """The maps of every image, in order: image by image unless a method batches them."""
        return (self.explain(p, indices) for p in pixels)

    def sized(self, m: np.ndarray, pixels: np.ndarray, indices: list[int]) -> np.ndarray:
        """One image's maps at its size, one per label."""
        if self.upsample:
            m = resize_map(m, pixels.shape[:2])
        if self.rectify:
            m = np.maximum(m, 0.0)
        if self.class_agnostic:
            m = np.repeat(m, len(indices), axis=0)
        return m

    def __call__(self, image, label):
        pixels, is_batch, indices, several = images_and_labels(self.net, image, label, self.where)
        self.setup(pixels, indices)
        maps = [self.sized(m, p, indices) for m, p in zip(self.explain_all(pixels, indices), pixels)]
        return finish(maps, is_batch, several, self.where)


def fill_colour(mask_value, small: np.ndarray) -> np.ndarray:
    """The colour hidden pixels take, per channel: the image's mean colour for "auto", else the value
    the option's declaration validated (one, or one per channel)."""
    c = small.shape[-1]
    if isinstance(mask_value, str):  # "auto"
        return small.reshape(-1, c).mean(axis=0).astype(np.float32)
    return np.broadcast_to(np.asarray(mask_value, np.float32), (c,)).copy()
