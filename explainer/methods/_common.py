"""What every method does before and after its own work: images in, labels resolved, maps out."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import InvalidParameterError, NonFiniteOutputError
from ..io import to_pixel_batch
from ..model.preprocess import resize_map  # noqa: F401  (the methods' import of it)

if TYPE_CHECKING:
    from ..runtime.classifier import Classifier


def images_and_labels(net: Classifier, image, label, where: str):
    """(list of canonical H x W x C pixel arrays, whether a batch was given, class indices, several?)"""
    pixels, is_batch = to_pixel_batch(image)
    indices, several = net.class_indices(label, f"{where}: label")
    return pixels, is_batch, indices, several


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


def fill_colour(mask_value, small: np.ndarray) -> np.ndarray:
    """The colour hidden pixels take, per channel: the image's mean colour for "auto", else the value
    the option's declaration validated (one, or one per channel)."""
    c = small.shape[-1]
    if isinstance(mask_value, str):  # "auto"
        return small.reshape(-1, c).mean(axis=0).astype(np.float32)
    return np.broadcast_to(np.asarray(mask_value, np.float32), (c,)).copy()
