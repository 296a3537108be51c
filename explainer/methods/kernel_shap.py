"""KernelSHAP on superpixels (Lundberg & Lee 2017), estimated as Captum's ``KernelShap``, on onnxruntime.

The image is resized to the network's input size and cut into features as LIME cuts it (SLIC
superpixels, a grid or a label matrix; ``lime.segment``, the option declared once as
``lime.SEGMENTATION``); a feature "off" takes the mask value (``lime.segment_fill``); values are painted on
their superpixels and resized as LIME's maps (``lime.paint``). KernelSHAP is LIME with the weights
that make the surrogate's coefficients the features' Shapley values for the class probabilities:

* sampling as Captum's ``kernel_shap_perturb_generator``: the first sample has every feature on, the
  second none; each further sample draws how many features are on, k in 1..F-1, with probability
  proportional to (F - 1) / (k (F - k)), then which k uniformly. Drawing coalitions in proportion to
  the Shapley kernel lets every drawn sample weigh the same (1);
* the two end samples weigh 1e6 (Captum's ``inf_weight``; in theory infinite), which pins the fit's
  intercept to f(none) and the sum of the values to f(all) - f(none) (the efficiency property);
* the surrogate is an unregularised weighted linear regression with intercept (Captum's default
  ``SkLearnLinearRegression``, i.e. scikit-learn's ``LinearRegression``), in float64.

Fed the same samples, Captum's ``KernelShap`` gives the same values (tests/test_kernel_shap.py). The
samples are drawn up front from ``random_state`` (numpy, not torch: the values equal Captum's for the
same samples, not for the same seed); all labels share their forward passes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ._common import MapMethod, one_image, with_batch
from ..runtime.perturb import BACKENDS, Canvas, stream_probabilities
from .lime import SEGMENTATION, UPSAMPLING, paint, segment, segment_fill
from .registry import FORWARD_ONLY, BatchSize, Choice, Flag, Int, PixelValue, Seed, method, twin_of

if TYPE_CHECKING:
    from ..runtime.classifier import Classifier

INF_WEIGHT = 1e6  # Captum's weight of the all-on and all-off samples


@dataclass
class KernelShapExplanation:
    """Everything one KernelSHAP run computed, for one image."""
    map: np.ndarray  # (K, H, W) Shapley value per pixel at the image's size (or network size: "none")
    segments: np.ndarray  # (h, w) int feature index per pixel, at the network's input size
    values: np.ndarray  # (K, F) Shapley value of each feature per label
    base_values: np.ndarray  # (K,) the fit's intercept: ~ the probability with every feature off
    samples: np.ndarray  # (n, F) 1 = feature on; row 0 all on, row 1 all off
    probabilities: np.ndarray  # (n, K) class probabilities of the samples
    kernel_weights: np.ndarray  # (n,) 1e6 for the two end samples, 1 otherwise
    labels: list


def draw_samples(num_features: int, num_samples: int, random_state) -> np.ndarray:
    """(num_samples, F) int8 coalitions as Captum's KernelShap draws them: all on, all off, then the
    number on from the Shapley kernel's distribution over 1..F-1 and which ones uniformly."""
    rng = np.random.default_rng(random_state)
    f = num_features
    n = max(num_samples - 2, 0) if f > 1 else 0  # one feature: the two end samples say everything
    sizes = np.arange(1, f)
    p = 1.0 / (sizes * (f - sizes))
    on = rng.choice(sizes, size=n, p=p / p.sum()) if n else np.zeros(0, int)
    ranks = rng.random((n, f)).argsort(axis=1).argsort(axis=1)  # a uniform permutation per sample
    drawn = ranks < on[:, None]
    return np.vstack([np.ones((1, f)), np.zeros((1, f)), drawn]).astype(np.int8)[:num_samples]


def shapley_kernel_weights(samples: np.ndarray) -> np.ndarray:
    """Captum's ``kernel_shap_similarity_kernel``: 1e6 where all or no features are on, else 1."""
    on = samples.sum(axis=1)
    return np.where((on == 0) | (on == samples.shape[1]), INF_WEIGHT, 1.0)


def fit_values(samples: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values (K, F), intercepts (K,)): one weighted least-squares fit for all target columns (the
    same design and weights, so the same as one fit per column)."""
    from sklearn.linear_model import LinearRegression

    reg = LinearRegression().fit(samples.astype(np.float64), targets.astype(np.float64), sample_weight=weights)
    return np.atleast_2d(reg.coef_), np.atleast_1d(reg.intercept_)


def _explain(net: Classifier, source, indices, *, num_features, num_samples, segmentation, mask_value, output_upsampling,
             batch, backend, random_state, verbose) -> KernelShapExplanation:
    """KernelSHAP for one canonical image (H x W x C pixels, 0..255) and class indices."""
    small = net.fit_pixels(source)
    segments = segment(small, segmentation, num_features)
    canvas = Canvas(net, small, segment_fill(mask_value, small, segments))
    samples = draw_samples(int(segments.max()) + 1, num_samples, random_state)
    off = samples == 0

    def make_batch(start, stop):
        return canvas.occlude_masks(off[start:stop][:, segments])

    probs = np.empty((len(samples), len(indices)), np.float32)
    for start, stop, p in stream_probabilities(net, make_batch, len(samples), batch_size=batch, backend=backend,
                                               verbose=verbose, desc="KernelSHAP"):
        probs[start:stop] = p[:, indices]
    weights = shapley_kernel_weights(samples)
    values, base = fit_values(samples, probs, weights)
    return KernelShapExplanation(paint(values, segments, source.shape[:2], output_upsampling), segments,
                                 values.astype(np.float32), base.astype(np.float32), samples, probs, weights,
                                 indices)


@method("kernel_shap", kind=FORWARD_ONLY,
        options=dict(
            num_features=Int(2, 100_000, help="about how many superpixels (or grid cells) to cut the image into"),
            num_samples=Int(2, 10_000_000, help="coalitions evaluated (forward passes), the two end ones included"),
            segmentation=SEGMENTATION,
            mask_value=PixelValue(("auto", "segment-mean"), help="what a feature that is off shows"),
            output_upsampling=Choice(UPSAMPLING,
                                     help="how the network-size map is resized to the image ('none': not)"),
            batch_size=BatchSize(), backend=Choice(BACKENDS), random_state=Seed(), verbose=Flag()),
        answers="how much each superpixel, shown instead of the mask value, adds to the class probability, "
                "shared fairly among the superpixels (Shapley values)",
        returns="maps at the image's size, signed, in probability units; per label, the values of all "
                "superpixels sum to about p(image) - p(all masked)",
        cost="num_samples forward passes (all labels share them)",
        reference="Captum's KernelShap given the same samples, feature mask and baseline", order=70)
def kernel_shap(net: Classifier, image, label, *, num_features=49, num_samples=2048, segmentation="superpixels",
                mask_value="auto", output_upsampling="bicubic", batch_size="auto", backend="onnxruntime",
                random_state=None, verbose=True):
    """KernelSHAP map(s): (H, W) for one label, (K, H, W) for several (labels share the samples).
    ``kernel_shap_explanation`` returns the segmentation, samples and per-feature values too."""
    return KernelShap(net, **with_batch(net, dict(
        num_features=num_features, num_samples=num_samples, segmentation=segmentation, mask_value=mask_value,
        output_upsampling=output_upsampling, batch_size=batch_size, backend=backend, random_state=random_state,
        verbose=verbose), "kernel_shap"))(image, label)


class KernelShap(MapMethod):
    where = "kernel_shap"
    upsample = False  # paint() sizes the maps (output_upsampling)

    def explain(self, pixels, indices):
        return _explain(self.net, pixels, indices, **self.options).map


@twin_of(kernel_shap)
def kernel_shap_explanation(net: Classifier, image, label, **options) -> KernelShapExplanation:
    """KernelSHAP for one image with all intermediate results (segments, samples, values); the
    options are ``kernel_shap``'s, validated by its declarations."""
    where = "kernel_shap_explanation"
    pixels, indices = one_image(net, image, label, where)
    return _explain(net, pixels, indices, **with_batch(net, options, where))
