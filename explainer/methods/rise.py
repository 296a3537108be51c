"""RISE (Petsiuk, Das & Saenko 2018): randomized input sampling, forward passes only, on onnxruntime
(or the converted module).

The image is resized to the network's input size. Each of ``num_masks`` soft masks keeps part of it
and blends the rest toward ``mask_value``; the map is the masks weighted by the class probability of
their masked image, ``S_c = sum_i P_c(M_i * image + (1 - M_i) * fill) * M_i / (N * keep_probability)``:
about the class probability when a pixel is kept. All labels share the forward passes.

Masks are those of the paper's code (eclique/RISE ``generate_masks``): a random binary
``grid_size`` x ``grid_size`` grid (1 with probability ``keep_probability``), upsampled bilinearly
(skimage ``resize(order=1, mode="reflect")``) to ``(grid_size + 1) x cell`` (cell = ceil(input size /
grid_size)) and cropped at a random shift in [0, cell) per axis. Only the grids and shifts are drawn up
front (from ``np.random.default_rng(random_state)``); each batch's masks are made when the batch is
(the upsampling is two small matrix products), so memory does not grow with ``num_masks``.

The blend is written in the model's input space: preprocessing is affine per pixel, so blending the
normalised image and fill is exactly the normalised blend of the pixels. ``mask_value="auto"`` is the
image's mean colour (occlusion's default); the paper's code blends toward the input zero, which for
mean-subtracting preprocessing is ``mask_value=`` the preprocessing's mean.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from ._common import MapMethod, fill_colour
from ..runtime.perturb import BACKENDS, stream_probabilities
from .registry import FORWARD_ONLY, BatchSize, Choice, Flag, Float, Int, PixelValue, Seed, method

if TYPE_CHECKING:
    from ..runtime.classifier import Classifier

ESTIMATORS = ("paper", "centred")


def _upsample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of skimage's ``resize(order=1, mode="reflect", anti_aliasing=False)``
    along one axis: half-pixel centres, mirrored about the edge pixels outside them."""
    if n_in == 1:
        return np.ones((n_out, 1), np.float32)
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    src = np.abs(src)  # mirror below the first centre
    src = np.where(src > n_in - 1, 2 * (n_in - 1) - src, src)  # and above the last
    low = np.minimum(np.floor(src).astype(int), n_in - 2)
    frac = src - low
    out = np.zeros((n_out, n_in))
    out[np.arange(n_out), low] = 1 - frac
    out[np.arange(n_out), low + 1] = frac
    return out.astype(np.float32)


class RiseMasks:
    """The masks of one RISE run: random grids and shifts drawn once, full-size masks made on demand
    for any span of them (``masks(start, stop)``), always the same for the same span."""

    def __init__(self, size: tuple[int, int], num_masks: int, grid_size: int, keep_probability: float,
                 random_state=None):
        rng = np.random.default_rng(random_state)
        self.size, self.num_masks, self.keep_probability = tuple(size), num_masks, keep_probability
        cells = [math.ceil(s / grid_size) for s in size]
        # bool grids, drawn in chunks (the same stream as one draw): N x g x g bytes, no N-sized float temp
        chunks = [(min(65536, num_masks - i), grid_size, grid_size) for i in range(0, num_masks, 65536)]
        self.grids = np.concatenate([rng.random(shape) < keep_probability for shape in chunks])
        self.shifts = np.stack([rng.integers(0, c, num_masks) for c in cells], axis=1)
        self._rows, self._cols = (_upsample_matrix(grid_size, (grid_size + 1) * c) for c in cells)

    def masks(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """(n, H, W) float32 masks ``start .. stop-1`` in [0, 1]: upsample-then-crop is a crop of the
        interpolation matrices, so each mask is rows @ grid @ cols.T."""
        stop = self.num_masks if stop is None else stop
        (h, w), shifts = self.size, self.shifts[start:stop]
        rows = self._rows[shifts[:, :1] + np.arange(h)]  # (n, H, g)
        cols = self._cols[shifts[:, 1:] + np.arange(w)]  # (n, W, g)
        return rows @ self.grids[start:stop].astype(np.float32) @ cols.transpose(0, 2, 1)


def rise_masks(net: Classifier, num_masks: int = 2000, grid_size: int = 7, keep_probability: float = 0.5,
               random_state=None) -> RiseMasks:
    """The masks ``rise`` uses with the same arguments and seed (``.masks()`` gives them all: keep
    ``num_masks`` small, they take H x W x 4 bytes each)."""
    return RiseMasks(net.input.size, num_masks, grid_size, keep_probability, random_state)


@method("rise", kind=FORWARD_ONLY,
        options=dict(num_masks=Int(1, 10_000_000, help="random masks (forward passes); the map's noise "
                                                       "falls as 1 / sqrt(num_masks)"),
                     grid_size=Int(1, 1024, help="cells per side of the random grid: the scale of the "
                                                 "regions the map resolves"),
                     keep_probability=Float(0.0, 1.0, min_inclusive=False,
                                            help="probability that a grid cell is kept"),
                     mask_value=PixelValue(help="the colour masked pixels blend toward ('auto': the "
                                                "image's mean colour)"),
                     estimator=Choice(ESTIMATORS, help="'centred': the paper's expected map without the chance "
                                                       "coverage of each pixel by the masks (far less noise); "
                                                       "'paper': sum_i P_i M_i / (N p) exactly (DIANNA's)"),
                     batch_size=BatchSize(), backend=Choice(BACKENDS),
                     random_state=Seed(help="seed of the masks (None: new masks on every call)"),
                     verbose=Flag()),
        answers="which regions, when kept while random others are hidden, keep the class probability high",
        returns="maps at the image's size, in probability units (the mean class probability of the "
                "masked images that keep each pixel)",
        cost="num_masks forward passes (all labels, and all images of a batch, share the masks)",
        reference="the paper's formula (estimator='paper') and the centred one on the same masks, computed "
                  "independently (tests/test_rise.py); "
                  "masks equal to eclique/RISE generate_masks' skimage upsampling", order=60)
def rise(net: Classifier, image, label, *, num_masks=2000, grid_size=7, keep_probability=0.5, mask_value="auto",
         estimator="centred", batch_size="auto", backend="onnxruntime", random_state=None, verbose=True):
    """RISE map(s): (H, W) for one label, (K, H, W) for several, at the image's size."""
    return Rise(net, num_masks=num_masks, grid_size=grid_size, keep_probability=keep_probability,
                mask_value=mask_value, estimator=estimator, batch_size=batch_size, backend=backend,
                random_state=random_state, verbose=verbose)(image, label)


class Rise(MapMethod):
    where = "rise"

    def __init__(self, net: Classifier, **options):
        super().__init__(net, **options)
        self.batch = net.resolve_batch_size(self.batch_size, self.where, self.backend)

    def setup(self, pixels, indices):  # one set of masks for all the images
        self.masks = rise_masks(self.net, self.num_masks, self.grid_size, self.keep_probability, self.random_state)

    def explain(self, pixels, indices):
        small = self.net.fit_pixels(pixels)
        return _saliency(self.net, small, fill_colour(self.mask_value, small), self.masks, indices, self.batch,
                         self.backend, self.verbose, centred=self.estimator == "centred")


def _unrounded_input(net: Classifier, pixels: np.ndarray) -> np.ndarray:
    """The model input of N x H x W x C pixels as float32, before a uint8 input's rounding: blends of
    image and fill are made here and rounded once, as the blended pixels would be."""
    if net.input.dtype != np.uint8:
        return net.to_model_input(pixels.astype(np.float32)).astype(np.float32)
    x = net.preprocessing.normalise(pixels.astype(np.float32))
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if net.input.layout == "NCHW" else x, np.float32)


def _saliency(net: Classifier, small, fill, masks: RiseMasks, indices, batch, backend, verbose, centred=False) -> np.ndarray:
    """(K, h, w) RISE map at the network's size for one network-size image. ``centred``: the paper's sum
    minus mean(P) x (how often each pixel was kept) / (N p), plus mean(P): the same expectation, without
    the noise of the masks' uneven coverage (which the paper's sum carries, weighted by mean(P))."""
    channels_first = net.input.layout == "NCHW"
    dtype = net.input.dtype
    base, fill_input = (_unrounded_input(net, p) for p in (small[None], np.broadcast_to(fill, small.shape)[None]))
    diff = base - fill_input

    made = {}  # each batch's masks, from make_batch (run in the streams' threads) to the sum below

    def make_batch(start, stop):  # fill + M * (image - fill), in model input
        m = made[start] = masks.masks(start, stop)
        x = fill_input + (m[:, None] if channels_first else m[..., None]) * diff
        if dtype == np.uint8:
            return np.clip(np.rint(x), 0, 255).astype(np.uint8)
        return x.astype(dtype, copy=False)

    h, w = net.input.size
    total = np.zeros((len(indices), h * w), np.float64)
    coverage = np.zeros(h * w, np.float64)
    probability = np.zeros(len(indices), np.float64)
    for start, stop, probs in stream_probabilities(net, make_batch, masks.num_masks, batch_size=batch,
                                                   backend=backend, verbose=verbose, desc="RISE"):
        # at most two batches per stream are in flight, so ``made`` holds a few batches' masks at a time
        m = made.pop(start).reshape(stop - start, -1)
        total += probs[:, indices].T @ m  # float32 per batch
        if centred:
            coverage += m.sum(axis=0)
            probability += probs[:, indices].sum(axis=0)
    scale = masks.num_masks * masks.keep_probability
    if centred:
        mean = probability[:, None] / masks.num_masks
        total = total - mean * coverage[None] + mean * scale
    return (total / scale).reshape(len(indices), h, w).astype(np.float32)
