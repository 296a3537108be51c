"""Occlusion sensitivity (Zeiler & Fergus 2014) with MATLAB's ``occlusionSensitivity`` options, on
onnxruntime (or the converted module).

The image is resized to the network's input size; a mask slides over it with ``stride``; the map at
each mask position is the drop of the class probability when that region is occluded. How each
"auto" resolves (H x W the network's input size):

* ``mask_size="auto"``: 20 % of H and of W, rounded (at least 1 pixel);
* ``stride="auto"``: 10 % of H and of W, rounded up;
* ``mask_value="auto"``: the image's mean colour (per channel);
* ``mask_clipping=True``: mask centres run over the whole image, from its first pixel, and masks are
  clipped at the borders; ``False``: masks lie fully inside the image (Captum's windows).
* ``batch_size="auto"``: the fastest batch size on the parallel onnxruntime streams the masks run on,
  measured once per model and machine (``Classifier.stream_batch_size``); where the incremental path
  runs (below) with a decided split, the fastest batch of mask positions through that split instead
  (crops, stages, pasting and suffix on the same streams), measured the same way once per model, mask
  geometry, split and machine (``incremental.Occluder.best_batch``; the first run of a geometry, which
  races the plain path against the splits, runs at the plain path's batch size).
* ``incremental="auto"``: on onnxruntime, recompute for each mask only what the mask can change: the
  graph is split after its spatially local prefix (``explainer.runtime.incremental``), the prefix runs
  on a crop around the mask and the rest on the clean activations with the crop pasted in; the maps
  are the plain path's (to float rounding). Used where it measures faster than the plain forward pass
  on this machine (decided on the first batches of the first run with a model and mask geometry, then
  remembered); graphs it cannot analyse run the plain path. ``incremental.last_decision(net)`` says
  which path ran and why. ``True``: incremental wherever the graph allows it; ``False``: plain.

``output_upsampling``: "bicubic" or "nearest" resize the grid of drops to the image size, "none"
returns the grid (K, gh, gw), "coverage" gives each pixel the mean drop of the masks covering it
(Captum's Occlusion output, at the network's input size, then resized like the others).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InvalidParameterError, UnsupportedModelError
from ..validation import refuse
from ._common import MapMethod, fill_colour, resize_map
from ..runtime.perturb import BACKENDS, Canvas, forward_fn, stream_probabilities
from .registry import FORWARD_ONLY, BatchSize, Choice, Custom, Flag, PixelValue, Size, method

if TYPE_CHECKING:
    from ..runtime.classifier import Classifier

UPSAMPLING = ("bicubic", "nearest", "none", "coverage")


def _resolve(value, size, default_fraction, rounding) -> tuple[int, int]:
    """A validated size option ('auto' or (h, w)) as (h, w) pixels."""
    if value == "auto":
        return tuple(max(1, int(rounding(default_fraction * s))) for s in size)
    return value


def _check_incremental(where, name, value, net=None):
    if isinstance(value, str) and value == "auto":
        return value
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    refuse(where, name, "'auto', True or False", value, type_error=not isinstance(value, str))


def mask_positions(size: int, mask: int, stride: int, clipping: bool) -> list[tuple[int, int]]:
    """[start, stop) of each mask along one axis."""
    if clipping:
        centres = range(0, size, stride)
        return [(max(0, c - mask // 2), min(size, c - mask // 2 + mask)) for c in centres]
    return [(t, t + mask) for t in range(0, size - mask + 1, stride)]


@method("occlusion", kind=FORWARD_ONLY,
        options=dict(mask_size=Size(help="occluding patch: 'auto' = 20 % of the input's height and width"),
                     stride=Size(help="step between patches: 'auto' = 10 % of the input size, rounded up"),
                     mask_value=PixelValue(help="the patch's colour: 'auto' = the image's mean colour"),
                     output_upsampling=Choice(UPSAMPLING), mask_clipping=Flag(), batch_size=BatchSize(),
                     backend=Choice(BACKENDS), verbose=Flag(),
                     incremental=Custom(_check_incremental, "'auto', True or False", invalid=["yes", 1, None],
                                        help="recompute only the region each mask changes (exact): 'auto' "
                                             "where measured faster")),
        answers="how much the class probability drops when each region of the image is hidden",
        returns="maps at the image's size: probability drops (positive: the region supports the class)",
        cost="one forward pass per patch position (all labels share them)",
        reference="Captum's Occlusion (mask_clipping=False, output_upsampling='coverage')", order=40)
def occlusion_sensitivity(net: Classifier, image, label, *, mask_size="auto", stride="auto", mask_value="auto",
                          output_upsampling="bicubic", mask_clipping=True, batch_size="auto",
                          backend="onnxruntime", verbose=True, incremental="auto"):
    """Occlusion map(s): (H, W) for one label, (K, H, W) for several (all labels share the forward
    passes); values are probability drops (positive: the region supports the class)."""
    return Occlusion(net, mask_size, stride, mask_value=mask_value, output_upsampling=output_upsampling,
                     mask_clipping=mask_clipping, batch_size=batch_size, backend=backend, verbose=verbose,
                     incremental=incremental)(image, label)


class Occlusion(MapMethod):
    where = "occlusion_sensitivity"
    upsample = False  # _upsample: output_upsampling's modes

    def __init__(self, net: Classifier, mask_size, stride, **options):
        super().__init__(net, **options)
        size = net.input.size
        mask = _resolve(mask_size, size, 0.2, round)
        step = _resolve(stride, size, 0.1, math.ceil)
        if mask[0] > size[0] or mask[1] > size[1]:
            raise InvalidParameterError(
                f"{self.where}: mask_size {mask} is larger than the network's input size {size}; it must be at "
                f"most {size}.")
        if self.incremental is True and self.backend != "onnxruntime":
            raise InvalidParameterError(f"{self.where}: incremental=True runs on onnxruntime; got backend="
                                        f"{self.backend!r} (use incremental='auto' or False with the torch backend).")
        self.batch = net.resolve_batch_size(self.batch_size, self.where, self.backend)
        self.rows = mask_positions(size[0], mask[0], step[0], self.mask_clipping)
        self.cols = mask_positions(size[1], mask[1], step[1], self.mask_clipping)

    def explain(self, pixels, indices):
        small = self.net.fit_pixels(pixels)
        grid = _drops(self.net, small, fill_colour(self.mask_value, small), self.rows, self.cols, indices, self.batch,
                      self.backend, self.verbose, self.incremental, auto_batch=self.batch_size == "auto")
        return _upsample(grid, self.rows, self.cols, self.net.input.size, pixels.shape[:2], self.output_upsampling)


def _occluder(net: Classifier, canvas, rows, cols, batch, incremental):
    """The incremental forward passes, or None for the plain path (its reason kept for
    ``incremental.last_decision``)."""
    from ..runtime import incremental as inc

    try:
        occluder = inc.Occluder(net, canvas, rows, cols, batch, incremental)
    except Exception as exc:  # the analysis is best effort; the plain path is always right
        message = str(exc).splitlines()[0][:200] if str(exc) else ""
        why = f"the graph could not be split ({type(exc).__name__}: {message})"
        if incremental is True:
            raise UnsupportedModelError(f"occlusion_sensitivity: incremental=True: {why}") from None
        inc.record_decision(net, inc.Decision(False, why))
        return None
    decision = occluder.decision
    if decision is not None and not decision.incremental:
        if incremental is True:
            raise UnsupportedModelError(f"occlusion_sensitivity: incremental=True: {decision.reason}")
        return None
    return occluder


def _drops(net: Classifier, small, fill, rows, cols, indices, batch, backend, verbose, incremental="auto",
           auto_batch=False):
    positions = [(r, c) for r in rows for c in cols]
    canvas = Canvas(net, small, fill)

    def make_batch(start, stop):
        out = canvas.copies(stop - start)
        for k, (r, c) in enumerate(positions[start:stop]):
            canvas.occlude_rectangle(out[k], r, c)
        return out

    original = forward_fn(net, backend)(canvas.base)[0, indices]
    forward = None
    if incremental is not False and backend == "onnxruntime":
        occluder = _occluder(net, canvas, rows, cols, batch, incremental)
        if occluder is not None:  # the batches are mask positions; the occluder builds the crops
            forward = occluder.forward
            if auto_batch and not occluder.racing and occluder.decision.incremental:
                batch = occluder.best_batch()  # the split's own best batch, not the plain forward's
    batches = make_batch if forward is None else lambda start, stop: positions[start:stop]
    drops = np.empty((len(positions), len(indices)), np.float32)
    for start, stop, probs in stream_probabilities(net, batches, len(positions), batch_size=batch,
                                                   backend=backend, verbose=verbose, desc="occlusion",
                                                   forward=forward):
        drops[start:stop] = original[None, :] - probs[:, indices]
    return drops.T.reshape(len(indices), len(rows), len(cols))


def _upsample(grid, rows, cols, size, image_size, mode):
    if mode == "none":
        return grid
    if mode == "coverage":
        total = np.zeros((len(grid), *size), np.float64)
        count = np.zeros(size, np.float64)
        for i, (r0, r1) in enumerate(rows):
            for j, (c0, c1) in enumerate(cols):
                total[:, r0:r1, c0:c1] += grid[:, i, j][:, None, None]
                count[r0:r1, c0:c1] += 1
        full = (total / np.maximum(count, 1)).astype(np.float32)
        return resize_map(full, image_size)
    if mode == "nearest":
        import cv2

        return np.stack([cv2.resize(g, (image_size[1], image_size[0]), interpolation=cv2.INTER_NEAREST)
                         for g in grid]).astype(np.float32)
    return resize_map(grid, image_size)
