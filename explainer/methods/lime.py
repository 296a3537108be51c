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

Fewer forward passes, the same answer: what a user reads off a LIME map is which superpixels rank
highest, so sampling stops once that ranking is settled. At checkpoints from max(4 F, 64) samples on,
each 1.25 x the last, the chosen surrogate is refitted on ``STOP_RESAMPLES`` (40) bootstrap resamples
of the samples drawn so far (their own generator, seeded from ``random_state``, so the sample stream
is untouched); sampling stops when, for every label, the set of the ``stop_top_k`` (5) highest
features (highest weight: the map's brightest superpixels) is the same as the fit on all samples' in
all but ``stop_tolerance`` (10 %, i.e. 36 of 40) of the resamples. A bootstrap refit varies about as
much as a new run with as many samples, so a top-k that survives resampling is the one a full run
finds; where it does not settle (near ties, which full runs with different seeds do not agree on
either), all ``num_samples`` are drawn. The forward passes are the whole cost of LIME; a check stops
counting once too many refits differ, so it costs a few surrogate fits, 41 when it passes.
``benchmarks/lime_stop.py`` (20 images, default run vs full runs with other seeds): top-3 / top-5
agreement tree 0.83 / 0.80 vs full-vs-full 0.83 / 0.79 with 1880 samples on average (92 % of 2048),
linear 0.93 / 0.90 vs 0.90 / 0.90 with 1508 (74 %); checks 5 % (tree) and 0.6 % (linear) of the
forward-pass time; the previous rule (weight standard errors, ~370 samples) agreed 0.58 / 0.57 and
0.79 / 0.81. The progress bar ends with why sampling stopped (also ``stop_reason`` of
``lime_explanation``'s result). ``stop_tolerance=None`` draws all ``num_samples`` (and reproduces
the lime package exactly); stopped or not, the samples are a prefix of the full run's.
"""
from __future__ import annotations

import math
from contextlib import closing
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .. import progress
from ..errors import InvalidParameterError, InvalidParameterTypeError
from ._common import MapMethod, fill_colour, one_image, resize_map, with_batch
from ..runtime.perturb import BACKENDS, Canvas, stream_probabilities
from .registry import (FORWARD_ONLY, BatchSize, Choice, Custom, Flag, Float, Int, Optional, PixelValue, Seed, method,
                       twin_of)

if TYPE_CHECKING:
    from ..runtime.classifier import Classifier

MODELS = ("tree", "linear")
SEGMENTATIONS = ("superpixels", "grid")
UPSAMPLING = ("bicubic", "nearest", "none")
STOP_RESAMPLES = 40  # bootstrap refits per stop check: tolerance steps of 2.5 %
STOP_GROWTH = 1.25  # each stop check comes after 25 % more samples than the last


@dataclass
class LimeExplanation:
    """Everything one LIME run computed, for one image."""
    map: np.ndarray  # (K, H, W) importance per pixel at the image's size (or network size: "none")
    segments: np.ndarray  # (h, w) int feature index per pixel, at the network's input size
    weights: np.ndarray  # (K, F) importance of each feature per label
    samples: np.ndarray  # (n, F) 1 = feature kept; n <= num_samples when sampling stopped early
    probabilities: np.ndarray  # (n, K) class probabilities of the samples
    kernel_weights: np.ndarray  # (n,)
    labels: list
    stop_reason: str = ""  # why sampling stopped where it did ("" when stop_tolerance is None)


def segment(pixels: np.ndarray, segmentation, num_features: int) -> np.ndarray:
    """Feature index (0..F-1) per pixel of the network-size image."""
    h, w = pixels.shape[:2]
    if isinstance(segmentation, str):
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
    if labels.shape != (h, w):
        import cv2

        labels = cv2.resize(labels.astype(np.int32), (w, h), interpolation=cv2.INTER_NEAREST)
    relabelled = np.unique(labels, return_inverse=True)[1].reshape(h, w)
    if relabelled.max() < 1:  # a small region lost when the matrix was resized to the network's size
        raise InvalidParameterError(f"segmentation: the label matrix has a single label at the network's input "
                                    f"size {h} x {w}; it needs at least 2.")
    return relabelled


def check_segmentation(where, name, value, net):
    """The ``segmentation`` option of LIME and KernelSHAP (one declaration, ``SEGMENTATION``)."""
    allowed = "'superpixels', 'grid' or a 2-D integer label matrix with at least 2 distinct labels"
    if isinstance(value, str):
        if value not in SEGMENTATIONS:
            raise InvalidParameterError(f"{where}: {name} must be {allowed}; got {value!r}.")
        return value
    labels = np.asarray(value)
    if labels.ndim != 2 or labels.dtype.kind not in "iu":
        raise InvalidParameterTypeError(f"{where}: {name} must be {allowed}; got " + (
            f"an array of shape {labels.shape} and dtype {labels.dtype}." if labels.ndim else f"{value!r}."))
    if len(np.unique(labels)) < 2:
        raise InvalidParameterError(f"{where}: {name} must be {allowed}; got a single label.")
    return labels


SEGMENTATION = Custom(check_segmentation, "'superpixels' (SLIC), 'grid' or a 2-D integer label matrix",
                      invalid=["voronoi", 3, np.zeros((2, 2, 2), int), np.zeros((4, 4)), np.zeros((4, 4), np.int64)],
                      help="how the image is cut into features")


def kernel_weights(samples: np.ndarray, width: float) -> np.ndarray:
    """The lime package's kernel on the cosine distance between each sample and the all-on sample."""
    from sklearn.metrics import pairwise_distances

    d = pairwise_distances(samples, samples[0:1], metric="cosine").ravel()
    return np.sqrt(np.exp(-(d ** 2) / width ** 2))


def ridge(samples, targets, weights, alpha: float = 1.0) -> np.ndarray:
    """(K, F) coefficients of the weighted ridge fit with an unpenalised intercept per target column:
    scikit-learn's ``Ridge(alpha)`` (the lime package's surrogate) solved once for all columns, from the
    normal equations, because the stop check refits it dozens of times."""
    x = samples.astype(np.float64)
    total = weights.sum()
    xc = x - weights @ x / total
    yc = targets - weights @ targets / total
    gram = xc.T @ (xc * weights[:, None]) + alpha * np.eye(x.shape[1])
    return np.linalg.solve(gram, xc.T @ (yc * weights[:, None])).T


def fit_surrogate(samples, targets, weights, model: str, random_state) -> np.ndarray:
    """Per-feature importance for each target column: (K, F)."""
    if model == "linear":
        return ridge(samples, targets, weights)
    from sklearn.tree import DecisionTreeRegressor

    out = np.zeros((targets.shape[1], samples.shape[1]), np.float64)
    for k in range(targets.shape[1]):
        reg = DecisionTreeRegressor(random_state=random_state if isinstance(random_state, int) else 0)
        out[k] = reg.fit(samples, targets[:, k], sample_weight=weights).feature_importances_
    return out


def top_k(importance: np.ndarray, k: int) -> np.ndarray:
    """(K, k) the indices of each row's k highest importances, sorted by index (a set per label)."""
    return np.sort(np.argsort(-importance, axis=1, kind="stable")[:, :k], axis=1)


def differing_resamples(samples, targets, weights, model, k: int, allowed: int, rng, random_state) -> int:
    """How many of ``STOP_RESAMPLES`` bootstrap refits of the surrogate change some label's top-k set
    from the fit on all samples. Counting ends at ``allowed + 1``: an unsettled ranking shows itself in
    a few refits, so most checks cost a few fits, not all of them. BLAS runs on one thread here: the
    matrices are small, and the forward passes keep the other cores busy meanwhile (two threads made the
    ridge fit 20 x slower on a busy 2-core machine)."""
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    n = len(samples)
    with threadpool_limits(1):
        reference = top_k(fit_surrogate(samples, targets, weights, model, random_state), k)
        differ = 0
        for _ in range(STOP_RESAMPLES):
            counts = np.bincount(rng.integers(0, n, n), minlength=n)  # a resample: how often each was drawn
            drawn = counts > 0
            refit = fit_surrogate(samples[drawn], targets[drawn], (weights * counts)[drawn], model, random_state)
            differ += not np.array_equal(top_k(refit, k), reference)
            if differ > allowed:
                break
    return differ


def paint(values: np.ndarray, segments: np.ndarray, size, output_upsampling: str) -> np.ndarray:
    """(K, H, W) float32 map of per-feature values (K, F): each feature's value on its pixels at the
    network's size, resized to ``size`` bicubically, with sharp borders ('nearest') or not ('none')."""
    per_pixel = values[:, segments].astype(np.float32)
    if output_upsampling == "none":
        return per_pixel
    if output_upsampling == "nearest":
        import cv2

        return np.stack([cv2.resize(m, (size[1], size[0]), interpolation=cv2.INTER_NEAREST) for m in per_pixel])
    return resize_map(per_pixel, size)


OPTIONS = dict(
    num_features=Int(2, 100_000, help="superpixels (or grid cells) the image is cut into"),
    num_samples=Int(2, 10_000_000, help="the most perturbed images drawn"),
    segmentation=SEGMENTATION,
    model=Choice(MODELS, help="the surrogate: 'tree' (MATLAB's default) or 'linear' (the lime package's)"),
    output_upsampling=Choice(UPSAMPLING),
    mask_value=PixelValue(("auto", "segment-mean"), help="what switched-off features show: 'auto' = the "
                          "image's mean colour, 'segment-mean' = each superpixel's own mean (lime's default)"),
    kernel_width=Float(0.0, min_inclusive=False),
    stop_tolerance=Optional(Float(0.0, 1.0), help="stop sampling once the top stop_top_k features differ in at "
                                                  "most this fraction of bootstrap refits; None: draw all "
                                                  "num_samples"),
    stop_top_k=Int(1, 100_000, help="how many top-ranked features must be settled before sampling stops "
                                    "(at most F - 1)"),
    batch_size=BatchSize(), backend=Choice(BACKENDS), random_state=Seed(), verbose=Flag())

METHOD_DECLARATION = dict(
    kind=FORWARD_ONLY, options=OPTIONS,
    answers="which superpixels, switched on or off together at random, best explain the class probability "
            "through a simple surrogate model",
    returns="maps at the image's size: each superpixel's importance (tree: impurity decrease; linear: "
            "coefficient)",
    cost="up to num_samples forward passes (fewer once the top superpixels are settled; all labels share them)",
    reference="the lime package's LimeImageExplainer (model='linear', same segments and samples)")


def _explain(net: Classifier, source, indices, *, num_features, num_samples, segmentation, model, output_upsampling,
             mask_value, kernel_width, stop_tolerance, stop_top_k, batch, backend, random_state,
             verbose) -> LimeExplanation:
    """LIME for one canonical image (H x W x C pixels, 0..255) and class indices."""
    small = net.fit_pixels(source)
    segments = segment(small, segmentation, num_features)
    n_feat = int(segments.max()) + 1
    canvas = Canvas(net, small, segment_fill(mask_value, small, segments))

    rng = np.random.RandomState(random_state)
    samples = rng.randint(0, 2, num_samples * n_feat).reshape(num_samples, n_feat)
    samples[0, :] = 1
    off = samples == 0

    def make_batch(start, stop):
        return canvas.occlude_masks(off[start:stop][:, segments])

    probs = np.empty((num_samples, len(indices)), np.float32)
    all_weights = kernel_weights(samples, kernel_width)
    stopping = stop_tolerance is not None
    k = min(stop_top_k, n_feat - 1)
    allowed = int(math.floor(stop_tolerance * STOP_RESAMPLES + 1e-9)) if stopping else 0
    # the resamples' own generator: the sample stream, and so the full run's prefix, stays the same
    resampling = np.random.default_rng(None if random_state is None else (random_state, 1))
    check = max(4 * n_feat, 64) if stopping else num_samples
    used, reason, checked = num_samples, "", 0
    # LIME drives its own bar (the stream's is off) to show the checks and why sampling stopped; the
    # line stays on screen when there is a reason to read
    with progress.bar(total=num_samples, desc="LIME", unit="img", verbose=verbose) as bar, \
            closing(stream_probabilities(net, make_batch, num_samples, batch_size=batch, backend=backend,
                                         verbose=False)) as stream:
        for start, stop, p in stream:
            probs[start:stop] = p[:, indices]
            bar.update(stop - start)
            # checks at fixed sample counts, whatever the batch size: the same seed, the same answer
            while check <= stop and check < num_samples and not reason:
                checked = check
                differ = differing_resamples(samples[:check], probs[:check].astype(np.float64),
                                             all_weights[:check], model, k, allowed, resampling, random_state)
                if differ <= allowed:
                    used = check
                    reason = (f"stopped at {check}/{num_samples}: top-{k} stable in {STOP_RESAMPLES - differ}/"
                              f"{STOP_RESAMPLES} resamples")
                else:
                    bar.set_postfix_str(f"top-{k} not stable at {check}", refresh=False)
                    check = math.ceil(check * STOP_GROWTH)
            if reason:
                break
        if stopping and not reason:
            reason = f"drew all {num_samples}: " + (f"top-{k} not stable at the last check ({checked})" if checked
                                                    else "too few for a stop check")
        if used < num_samples:
            bar.stopped_early(reason)
        elif reason:
            bar.set_postfix_str(reason)
    samples, probs, weights_k = samples[:used], probs[:used], all_weights[:used]
    importance = fit_surrogate(samples, probs.astype(np.float64), weights_k, model, random_state)
    return LimeExplanation(paint(importance, segments, source.shape[:2], output_upsampling), segments,
                           importance.astype(np.float32), samples, probs, weights_k, indices, reason)


def segment_fill(mask_value, small: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """What switched-off pixels show: the image's mean colour ('auto'), each segment's own mean colour
    ('segment-mean', the lime package's default hide_color=None) or the validated pixel value(s)."""
    if isinstance(mask_value, str) and mask_value == "segment-mean":
        flat = small.reshape(-1, small.shape[-1])
        counts = np.bincount(segments.ravel())
        means = np.stack([np.bincount(segments.ravel(), flat[:, i]) / counts for i in range(flat.shape[1])], 1)
        return means[segments].astype(np.float32)
    return fill_colour(mask_value, small)  # the Canvas takes it in float32 either way


class Lime(MapMethod):
    where = "image_lime"
    upsample = False  # paint() sizes the maps (output_upsampling)

    def explain(self, pixels, indices):
        return _explain(self.net, pixels, indices, **self.options).map


@method("lime", order=50, **METHOD_DECLARATION)
def image_lime(net: Classifier, image, label, *, num_features=49, num_samples=2048, segmentation="superpixels",
               model="tree", output_upsampling="bicubic", mask_value="auto", kernel_width=0.25,
               stop_tolerance=0.1, stop_top_k=5, batch_size="auto", backend="onnxruntime", random_state=None,
               verbose=True):
    """LIME importance map(s): (H, W) for one label, (K, H, W) for several (labels share the
    samples). ``lime_explanation`` returns the segmentation, samples, per-feature weights and why
    sampling stopped too."""
    return Lime(net, **with_batch(net, dict(
        num_features=num_features, num_samples=num_samples, segmentation=segmentation, model=model,
        output_upsampling=output_upsampling, mask_value=mask_value, kernel_width=kernel_width,
        stop_tolerance=stop_tolerance, stop_top_k=stop_top_k, batch_size=batch_size, backend=backend,
        random_state=random_state, verbose=verbose), "image_lime"))(image, label)


@twin_of(image_lime)
def lime_explanation(net: Classifier, image, label, **options) -> LimeExplanation:
    """LIME for one image with all intermediate results (segments, samples, weights, why sampling
    stopped); options as ``image_lime``'s."""
    pixels, indices = one_image(net, image, label, "image_lime", "lime_explanation")
    return _explain(net, pixels, indices, **with_batch(net, options, "image_lime"))
