"""Integrated gradients (Sundararajan et al. 2017): gradients averaged along the straight path from a
baseline image to the image, times their difference, so that the attributions add up to the score's
change (completeness)."""
from __future__ import annotations

import functools
import numbers
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InvalidParameterError
from .. import progress
from ._gradients import class_gradients, gradient_maps
from .registry import GRADIENT, BatchSize, Choice, Custom, Flag, Int, method

if TYPE_CHECKING:
    from ..runtime.classifier import Classifier

RULES = ("gausslegendre", "riemann_trapezoid")
DEFAULT_BATCH = 16


def _check_baseline(where, name, value, net):
    if value is None or isinstance(value, (str, np.ndarray)) or hasattr(value, "__fspath__") or hasattr(value, "getbands"):
        return value
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if not 0 <= float(value) <= 255:
            raise InvalidParameterError(f"{where}: {name} must be a pixel value in 0..255 or an image; got {value!r}.")
        return float(value)
    from ..errors import InvalidParameterTypeError

    raise InvalidParameterTypeError(f"{where}: {name} must be None (black), a pixel value in 0..255 or an "
                                    f"image of the image's size; got {value!r}.")


BASELINE = Custom(_check_baseline, "None (black), a pixel value in 0..255, or an image of the image's size",
                  invalid=[-1, 300, True, [1, 2]])


def rule_points(steps: int, rule: str):
    """(alphas, weights) of the integration rule on [0, 1]."""
    if rule == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return 0.5 * (nodes + 1), 0.5 * weights
    alphas = np.linspace(0.0, 1.0, steps)
    weights = np.full(steps, 1.0 / (steps - 1))
    weights[[0, -1]] *= 0.5
    return alphas, weights


def baseline_tensor(baseline, x):
    import torch

    if baseline is None:
        return torch.zeros_like(x)
    if isinstance(baseline, float):
        return torch.full_like(x, baseline)
    from ..io import to_pixels

    b = to_pixels(baseline, "baseline")
    if b.shape[:2] != tuple(x.shape[-2:]):
        raise InvalidParameterError(
            f"integrated_gradients: baseline must be a number (pixel value 0..255) or an image of the "
            f"same size as the image {tuple(x.shape[-2:])}; got size {b.shape[:2]}.")
    return torch.from_numpy(b).to(x.device).permute(2, 0, 1)[None].expand_as(x).clone()


def raw(engine, x, indices, *, steps, rule, baseline, batch_size, verbose):
    """Integrated gradients (K, C, H, W) for one image x (1, C, H, W) and K class indices."""
    import torch

    batch = engine.largest_batch(DEFAULT_BATCH if batch_size == "auto" else batch_size)  # the run budget
    base = baseline_tensor(baseline, x)
    alphas, weights = rule_points(steps, rule)
    total = torch.zeros((len(indices), *x.shape[1:]), dtype=torch.float64, device=x.device)
    jobs = [(a, w, j) for a, w in zip(alphas, weights) for j in range(len(indices))]
    for start in progress.bar(range(0, len(jobs), batch), desc="integrated gradients", verbose=verbose,
                              unit=f"x{batch}" if batch > 1 else "it"):
        part = jobs[start:start + batch]
        xs = torch.cat([base + float(a) * (x - base) for a, _, _ in part])
        g = class_gradients(engine, xs, [indices[j] for _, _, j in part], guided=False).double()
        for (a, w, j), gi in zip(part, g):
            total[j] += w * gi
    return ((x - base).double() * total).float()


@method("integrated_gradients", kind=GRADIENT, aliases=("integrated-gradients",),
        options=dict(steps=Int(2, 100_000, help="points of the path integral"), rule=Choice(RULES),
                     baseline=BASELINE, batch_size=BatchSize(), verbose=Flag()),
        answers="how much each pixel contributes to the score's difference from a baseline image "
                "(attributions add up to it)",
        returns="maps at the image's size in [0, 1]: the sum over channels of |attribution|, rescaled per map",
        cost="`steps` forward and backward passes per label",
        reference="Captum's IntegratedGradients on the converted module", order=100)
def integrated_gradients(net: Classifier, image, label, *, steps=50, rule="gausslegendre", baseline=None, batch_size="auto",
                         verbose=True):
    """Integrated-gradients map(s): (H, W) for one label, (K, H, W) for several, at the image's size."""
    return gradient_maps(net, image, label, "integrated_gradients", functools.partial(
        raw, steps=steps, rule=rule, baseline=baseline, batch_size=batch_size, verbose=verbose))
