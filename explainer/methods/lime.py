"""LIME on superpixels (Ribeiro et al. 2016) with MATLAB's ``imageLIME`` options, on onnxruntime.

The image is resized to the network's input size and cut into features (SLIC superpixels, a grid,
or a label matrix). Each sample switches a random half of the features off (their pixels take the
mask value); all labels share the samples' forward passes. A surrogate model fitted on (features on,
class probability), weighted by the LIME kernel, gives each feature its importance:

* ``model="linear"``: ridge regression (alpha 1) with the ``lime`` package's kernel
  sqrt(exp(-d^2 / width^2)) on the cosine distance to the unperturbed sample; its coefficients equal
  ``lime``'s for the same segments and samples (sampling follows ``lime``: a ``RandomState``'s
  ``randint(0, 2)``, first sample all on);
* ``model="tree"`` (MATLAB's default): a regression tree's impurity-based feature importances.

Fewer, smarter forward passes: ``stop_tolerance`` (default 0.15) ends the sampling early once the
estimated standard error of every feature's weight (ridge sandwich estimate, checked every 8 samples
or batch from 4 x F samples on) is below ``stop_tolerance`` x the largest |weight|, for every label. The
forward passes are the whole cost of LIME, so this is where the time goes; the map then changes less
than between two full runs with different seeds. ``stop_tolerance=None`` draws all ``num_samples``
(and reproduces the lime package exactly).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidParameterError, InvalidParameterTypeError
from ..validation import check_choice, check_float, check_int
from ._common import finish, images_and_labels, resize_map
from ._perturb import BACKENDS, Canvas, stream_probabilities

MODELS = ("tree", "linear")
SEGMENTATIONS = ("superpixels", "grid")
UPSAMPLING = ("bicubic", "nearest", "none")


@dataclass
class LimeExplanation:
    """Everything one LIME run computed, for one image."""
    map: np.ndarray  # (K, H, W) importance per pixel at the image's size (or network size: "none")
    segments: np.ndarray  # (h, w) int feature index per pixel, at the network's input size
    weights: np.ndarray  # (K, F) importance of each feature per label
    samples: np.ndarray  # (n, F) 1 = feature kept; n <= num_samples when sampling stopped early
    probabilities: np.ndarray  # (n, K) class probabilities of the samples
    kernel_weights: np.ndarray  # (num_samples,)
    labels: list


def segment(pixels: np.ndarray, segmentation, num_features: int) -> np.ndarray:
    """Feature index (0..F-1) per pixel of the network-size image."""
    h, w = pixels.shape[:2]
    if isinstance(segmentation, str):
        check_choice("image_lime", "segmentation", segmentation, SEGMENTATIONS)
        if segmentation == "grid":
            rows = int(math.ceil(math.sqrt(num_features)))
            cols = int(math.ceil(num_features / rows))
            r = np.minimum(np.arange(h) * rows // h, rows - 1)
            c = np.minimum(np.arange(w) * cols // w, cols - 1)
            return (r[:, None] * cols + c[None, :]).astype(np.int64)
        from skimage.segmentation import slic

        image = pixels / 255.0
        labels = slic(image if image.shape[2] == 3 else image[:, :, 0], n_segments=num_features,
                      compactness=10, start_label=0, channel_axis=-1 if image.shape[2] == 3 else None)
        return np.unique(labels, return_inverse=True)[1].reshape(h, w)
    labels = np.asarray(segmentation)
    if labels.ndim != 2 or labels.dtype.kind not in "iu":
        raise InvalidParameterError(
            "image_lime: segmentation must be 'superpixels', 'grid' or a 2-D integer label matrix; got "
            f"{'an array of shape ' + str(labels.shape) + ' and dtype ' + str(labels.dtype) if hasattr(segmentation, 'shape') else repr(segmentation)}.")
    if labels.shape != (h, w):
        import cv2

        labels = cv2.resize(labels.astype(np.int32), (w, h), interpolation=cv2.INTER_NEAREST)
    relabelled = np.unique(labels, return_inverse=True)[1].reshape(h, w)
    if relabelled.max() < 1:
        raise InvalidParameterError("image_lime: the label matrix needs at least 2 distinct labels.")
    return relabelled


def kernel_weights(samples: np.ndarray, width: float) -> np.ndarray:
    """The lime package's kernel on the cosine distance between each sample and the all-on sample."""
    from sklearn.metrics import pairwise_distances

    d = pairwise_distances(samples, samples[0:1], metric="cosine").ravel()
    return np.sqrt(np.exp(-(d ** 2) / width ** 2))


def fit_surrogate(samples, targets, weights, model: str, random_state) -> np.ndarray:
    """Per-feature importance for each target column: (K, F)."""
    out = np.zeros((targets.shape[1], samples.shape[1]), np.float64)
    for k in range(targets.shape[1]):
        if model == "linear":
            from sklearn.linear_model import Ridge

            reg = Ridge(alpha=1.0, fit_intercept=True)
            reg.fit(samples, targets[:, k], sample_weight=weights)
            out[k] = reg.coef_
        else:
            from sklearn.tree import DecisionTreeRegressor

            reg = DecisionTreeRegressor(random_state=random_state if isinstance(random_state, int) else 0)
            reg.fit(samples, targets[:, k], sample_weight=weights)
            out[k] = reg.feature_importances_
    return out


def weight_errors(samples, targets, weights, alpha: float = 1.0):
    """(coefficients, standard errors) of the weighted ridge fit per target column, (K, F) each:
    heteroscedasticity-robust sandwich estimate, cheap for the few dozen features LIME uses."""
    n, f = samples.shape
    x = np.hstack([np.ones((n, 1)), samples.astype(np.float64)])
    a = x.T @ (x * weights[:, None])
    a[1:, 1:] += alpha * np.eye(f)
    a_inv = np.linalg.inv(a)
    beta = a_inv @ (x.T @ (weights[:, None] * targets))
    residual = targets - x @ beta
    out_se = np.empty((targets.shape[1], f))
    for k in range(targets.shape[1]):
        meat = x.T @ (x * ((weights * residual[:, k]) ** 2)[:, None])
        out_se[k] = np.sqrt(np.clip(np.diag(a_inv @ meat @ a_inv), 0, None))[1:]
    return beta[1:].T, out_se


def _options(net, num_features, num_samples, segmentation, model, output_upsampling, mask_value, kernel_width,
             stop_tolerance, batch_size, backend, random_state, verbose) -> dict:
    """Every option checked once, before any work; returns them resolved."""
    where = "image_lime"
    check_choice(where, "model", model, MODELS)
    check_choice(where, "output_upsampling", output_upsampling, UPSAMPLING)
    check_choice(where, "backend", backend, BACKENDS)
    if isinstance(segmentation, str):
        check_choice(where, "segmentation", segmentation, SEGMENTATIONS)
    if stop_tolerance is not None:
        stop_tolerance = check_float(where, "stop_tolerance", stop_tolerance, minimum=0.0)
    if random_state is not None and not isinstance(random_state, (int, np.integer)):
        raise InvalidParameterTypeError(f"{where}: random_state must be None or an integer; got {random_state!r}.")
    return dict(num_features=check_int(where, "num_features", num_features, minimum=2, maximum=100_000),
                num_samples=check_int(where, "num_samples", num_samples, minimum=2, maximum=10_000_000),
                segmentation=segmentation, model=model, output_upsampling=output_upsampling,
                mask_value=mask_value, stop_tolerance=stop_tolerance, backend=backend,
                kernel_width=check_float(where, "kernel_width", kernel_width, minimum=0.0, min_inclusive=False),
                batch=net.resolve_batch_size(batch_size, where, backend),
                random_state=random_state, verbose=verbose)


def lime_explanation(net, image, label, *, num_features=49, num_samples=2048, segmentation="superpixels",
                     model="tree", output_upsampling="bicubic", mask_value="auto", kernel_width=0.25,
                     stop_tolerance=0.15, batch_size="auto", backend="onnxruntime", random_state=None,
                     verbose=True) -> LimeExplanation:
    """LIME for one image with all intermediate results (segments, samples, weights)."""
    options = _options(net, num_features, num_samples, segmentation, model, output_upsampling, mask_value,
                       kernel_width, stop_tolerance, batch_size, backend, random_state, verbose)
    pixels, is_batch, indices, _ = images_and_labels(net, image, label, "image_lime")
    if is_batch:
        raise InvalidParameterError("image_lime: lime_explanation takes one image; got a batch.")
    return _explain(net, pixels[0], indices, **options)


def _explain(net, source, indices, *, num_features, num_samples, segmentation, model, output_upsampling,
             mask_value, kernel_width, stop_tolerance, batch, backend, random_state, verbose) -> LimeExplanation:
    """LIME for one canonical image (H x W x C pixels, 0..255) and class indices."""
    small = net.fit_pixels(source)
    segments = segment(small, segmentation, num_features)
    n_feat = int(segments.max()) + 1
    fill = _fill(mask_value, small, segments)
    canvas = Canvas(net, small, fill)

    rng = np.random.RandomState(random_state)
    samples = rng.randint(0, 2, num_samples * n_feat).reshape(num_samples, n_feat)
    samples[0, :] = 1
    off = samples == 0

    def make_batch(start, stop):
        return canvas.occlude_masks(off[start:stop][:, segments])

    probs = np.empty((num_samples, len(indices)), np.float32)
    all_weights = kernel_weights(samples, kernel_width)
    # the check costs well under a millisecond for a few dozen features: run it every few samples so
    # that sampling stops close to where the weights settle
    first_check, every = 4 * n_feat, max(8, batch)
    next_check, used = first_check, num_samples
    for start, stop, p in stream_probabilities(net, make_batch, num_samples, batch_size=batch,
                                               backend=backend, verbose=verbose, desc="LIME"):
        probs[start:stop] = p[:, indices]
        if stop_tolerance and stop >= next_check and stop < num_samples:
            next_check = stop + every
            beta, se = weight_errors(samples[:stop], probs[:stop].astype(np.float64), all_weights[:stop])
            largest = np.abs(beta).max(axis=1)
            if np.all(se.max(axis=1) <= stop_tolerance * np.maximum(largest, 1e-12)):
                used = stop
                break
    samples, probs, weights_k = samples[:used], probs[:used], all_weights[:used]
    importance = fit_surrogate(samples, probs.astype(np.float64), weights_k, model, random_state)
    per_pixel = importance[:, segments].astype(np.float32)
    if output_upsampling == "none":
        full = per_pixel
    elif output_upsampling == "nearest":
        import cv2

        full = np.stack([cv2.resize(m, (source.shape[1], source.shape[0]), interpolation=cv2.INTER_NEAREST)
                         for m in per_pixel])
    else:
        full = resize_map(per_pixel, source.shape[:2])
    return LimeExplanation(full.astype(np.float32), segments, importance.astype(np.float32), samples,
                           probs, weights_k, indices)


def _fill(mask_value, small: np.ndarray, segments: np.ndarray) -> np.ndarray:
    c = small.shape[-1]
    if isinstance(mask_value, str):
        if mask_value == "auto":
            return small.reshape(-1, c).mean(axis=0)
        if mask_value == "segment-mean":  # the lime package's default (hide_color=None)
            flat = small.reshape(-1, c)
            counts = np.bincount(segments.ravel())
            means = np.stack([np.bincount(segments.ravel(), flat[:, i]) / counts for i in range(c)], 1)
            return means[segments].astype(np.float32)
        raise InvalidParameterError(
            f"image_lime: mask_value must be 'auto', 'segment-mean' or pixel values 0..255; got {mask_value!r}.")
    value = np.atleast_1d(np.asarray(mask_value, dtype=np.float64))
    if value.ndim != 1 or len(value) not in (1, c) or not np.all((value >= 0) & (value <= 255)):
        raise InvalidParameterError(
            f"image_lime: mask_value must be 'auto', 'segment-mean' or pixel values in 0..255; got {mask_value!r}.")
    return np.broadcast_to(value, (c,)).astype(np.float32)


def image_lime(net, image, label, *, num_features=49, num_samples=2048, segmentation="superpixels",
               model="tree", output_upsampling="bicubic", mask_value="auto", kernel_width=0.25,
               stop_tolerance=0.15, batch_size="auto", backend="onnxruntime", random_state=None, verbose=True):
    """LIME importance map(s): (H, W) for one label, (K, H, W) for several (labels share the
    samples). ``lime_explanation`` returns the segmentation, samples and per-feature weights too."""
    options = _options(net, num_features, num_samples, segmentation, model, output_upsampling, mask_value,
                       kernel_width, stop_tolerance, batch_size, backend, random_state, verbose)
    pixels, is_batch, indices, several = images_and_labels(net, image, label, "image_lime")
    maps = [_explain(net, p, indices, **options).map for p in pixels]
    return finish(maps, is_batch, several, "image_lime")
