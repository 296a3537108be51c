"""Is a map faithful? Deletion and insertion curves (Petsiuk et al. 2018, RISE) on onnxruntime, and the
model-randomisation sanity check (Adebayo et al. 2018) for gradient methods.

* deletion: pixels are removed, i.e. set to zero in the network's input space as RISE's code does
  (``baseline="zero"``: the preprocessing's mean colour), in order of decreasing saliency; the class
  probability should fall fast (low AUC is good). ``baseline="impute"`` fills removed pixels from
  their neighbours instead (ROAD's noisy linear imputation, ``explainer.imputation``): with a fixed
  colour the pattern of removed pixels itself destroys the prediction, so that pixel noise "wins";
  imputation removes the information without adding that artefact;
* insertion: starting from a blurred copy (Gaussian, kernel 11, sigma 5, as RISE), the original pixels
  come back in order of decreasing saliency; the probability should rise fast (high AUC is good).

Curves have ``steps + 1`` points at fractions 0, 1/steps, ..., 1 of the pixels (at the network's
input size; ties in saliency keep raster order); AUC by the trapezoid rule over [0, 1].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import InvalidParameterError
from .io import to_pixels
from .model.preprocess import resize, resize_map
from .runtime.perturb import BACKENDS, Canvas, stream_probabilities
from .validation import check_choice, check_int

if TYPE_CHECKING:
    from .runtime.classifier import Classifier

DELETION_BASELINES = ("zero", "black", "blur", "impute")
INSERTION_BASELINES = ("zero", "black", "blur")


@dataclass
class Curve:
    fractions: np.ndarray  # (steps + 1,)
    scores: np.ndarray  # class probability at each fraction
    auc: float


def _blurred(pixels: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(pixels, (11, 11), 5, borderType=cv2.BORDER_REFLECT_101)


def _curve(net: Classifier, image, saliency, label, steps, mode, baseline, batch_size, backend, verbose) -> Curve:
    where = mode
    steps = check_int(where, "steps", steps, minimum=1, maximum=1_000_000)
    check_choice(where, "backend", backend, BACKENDS)
    index = net.class_index(label, f"{where}: label")
    pixels = net.fit_pixels(to_pixels(image))
    sal = np.asarray(saliency, dtype=np.float32)
    if sal.ndim != 2:
        raise InvalidParameterError(f"{where}: saliency_map must be (H, W); got shape {sal.shape}.")
    if not np.all(np.isfinite(sal)):
        raise InvalidParameterError(f"{where}: saliency_map contains NaN or infinite values.")
    h, w = net.input.size
    if sal.shape != (h, w):
        sal = resize(sal[:, :, None], (h, w), clip=False)[:, :, 0]
    order = np.argsort(-sal.ravel(), kind="stable")
    if isinstance(baseline, str):
        allowed = DELETION_BASELINES if mode == "deletion" else INSERTION_BASELINES
        check_choice(where, "baseline", baseline, allowed)
        if baseline == "impute":
            other = None
        elif baseline == "zero":
            other = np.broadcast_to(_zero_input_pixels(net), pixels.shape).astype(np.float32)
        else:
            other = np.zeros_like(pixels) if baseline == "black" else _blurred(pixels)
    else:
        other = np.broadcast_to(np.asarray(baseline, np.float32), pixels.shape).astype(np.float32)
    # deletion: start = image, replaced pixels take the baseline; insertion: start = baseline
    start_img, fill = (pixels, other) if mode == "deletion" else (other, pixels)
    total = h * w
    counts = [int(round(total * s / steps)) for s in range(steps + 1)]
    rank = np.empty(total, np.int64)
    rank[order] = np.arange(total)
    rank = rank.reshape(h, w)

    if other is None:  # imputed: each step solves for its own fill
        from .imputation import impute

        def make_batch(a, b):
            return net.to_model_input(np.stack([impute(pixels, rank < counts[s], random_state=s)
                                                for s in range(a, b)]))
    else:
        canvas = Canvas(net, start_img, fill)

        def make_batch(a, b):
            return canvas.occlude_masks(np.stack([rank < counts[s] for s in range(a, b)]))

    batch = net.resolve_batch_size(batch_size, where, backend)
    scores = np.empty(steps + 1, np.float32)
    for a, b, p in stream_probabilities(net, make_batch, steps + 1, batch_size=batch, backend=backend,
                                        verbose=verbose, desc=mode):
        scores[a:b] = p[:, index]
    fractions = np.asarray(counts, np.float64) / total
    auc = float(np.trapezoid(scores, fractions) if hasattr(np, "trapezoid") else np.trapz(scores, fractions))
    return Curve(fractions, scores, auc)


def _zero_input_pixels(net: Classifier) -> np.ndarray:
    """The pixel colour (RGB, 0..255) that the preprocessing maps to zero."""
    pre = net.preprocessing
    mean = np.broadcast_to(np.asarray(pre.mean, np.float64), (3,))
    if pre.channel_order == "BGR":
        mean = mean[::-1]
    value = np.clip(mean / pre.scale, 0, 255).astype(np.float32)
    return value[:1] if net.input.channels == 1 else value


def deletion(net: Classifier, image, saliency_map, label, *, steps=100, baseline="zero", batch_size="auto",
             backend="onnxruntime", verbose=True) -> Curve:
    """Probability as the most salient pixels are removed first (to ``baseline``: "zero" (the
    network's zero input, RISE), "black", "blur", "impute" (from the neighbours, ROAD) or pixel
    values)."""
    return _curve(net, image, saliency_map, label, steps, "deletion", baseline, batch_size, backend, verbose)


def insertion(net: Classifier, image, saliency_map, label, *, steps=100, baseline="blur", batch_size="auto",
              backend="onnxruntime", verbose=True) -> Curve:
    """Probability as the most salient pixels are inserted first into ``baseline`` (default blurred)."""
    return _curve(net, image, saliency_map, label, steps, "insertion", baseline, batch_size, backend, verbose)


def random_map_auc(net: Classifier, image, label, *, seeds=10, steps=100, cells=None, deletion_baseline="zero",
                   verbose=False) -> dict:
    """Mean deletion and insertion AUC of random maps (the chance level): uniform noise per pixel, or
    with ``cells=n`` an n x n grid of uniform values upsampled (bicubic), whose smoothness matches
    coarse maps such as Grad-CAM's. (With a fixed-colour deletion baseline, pixel-wise noise deletes
    like salt noise, which destroys a CNN's texture cues faster than any contiguous region; with
    ``deletion_baseline="impute"`` it does not.)"""
    dels, ins = [], []
    h, w = to_pixels(image).shape[:2]
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        m = rng.random((h, w)).astype(np.float32) if cells is None else \
            resize_map(rng.random((1, cells, cells)).astype(np.float32), (h, w))[0]
        dels.append(deletion(net, image, m, label, steps=steps, baseline=deletion_baseline, verbose=verbose).auc)
        ins.append(insertion(net, image, m, label, steps=steps, verbose=verbose).auc)
    return {"deletion_auc": float(np.mean(dels)), "insertion_auc": float(np.mean(ins))}
