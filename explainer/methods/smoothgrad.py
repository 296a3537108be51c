"""SmoothGrad (Smilkov et al. 2017): the mean |gradient| over noisy copies of the image, which averages
away the gradient's pixel-level noise."""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from .. import progress
from ._gradients import class_gradients, gradient_maps
from .registry import GRADIENT, BatchSize, Flag, Float, Int, Seed, method

if TYPE_CHECKING:
    from ..runtime.classifier import Classifier

DEFAULT_BATCH = 16


def raw(engine, x, indices, *, samples, noise_level, random_state, batch_size, verbose):
    """Mean |gradient| over ``samples`` noisy copies, (K, C, H, W) for one image x (1, C, H, W): Captum's
    NoiseTunnel(Saliency) with abs=True. Noise drawn on the CPU generator, so CPU and GPU runs with one
    seed see the same noise."""
    import numpy as np
    import torch

    batch = engine.largest_batch(DEFAULT_BATCH if batch_size == "auto" else batch_size)  # the run budget
    seed = random_state if random_state is not None else int(np.random.SeedSequence().generate_state(1)[0])
    generator = torch.Generator().manual_seed(seed)
    noise = torch.normal(0.0, noise_level * 255.0, size=(samples, *x.shape[1:]), generator=generator).to(x.device)
    total = torch.zeros((len(indices), *x.shape[1:]), dtype=torch.float64, device=x.device)
    jobs = [(s, j) for j in range(len(indices)) for s in range(samples)]
    for start in progress.bar(range(0, len(jobs), batch), desc="smoothgrad", verbose=verbose,
                              unit=f"x{batch}" if batch > 1 else "it"):
        part = jobs[start:start + batch]
        xs = torch.stack([x[0] + noise[s] for s, _ in part])
        g = class_gradients(engine, xs, [indices[j] for _, j in part], guided=False).abs().double()
        for (s, j), gi in zip(part, g):
            total[j] += gi
    return (total / samples).float()


@method("smoothgrad", kind=GRADIENT,
        options=dict(samples=Int(1, 100_000, help="noisy copies"),
                     noise_level=Float(0.0, 10.0, help="noise standard deviation as a fraction of 255"),
                     random_state=Seed(), batch_size=BatchSize(), verbose=Flag()),
        answers="which pixels the class score is sensitive to, averaged over small perturbations of the image",
        returns="maps at the image's size in [0, 1]: the sum over channels of the mean |gradient|, rescaled per map",
        cost="`samples` forward and backward passes per label",
        reference="Captum's NoiseTunnel(Saliency, smoothgrad, abs) on the converted module", order=110)
def smoothgrad(net: Classifier, image, label, *, samples=25, noise_level=0.15, random_state=None, batch_size="auto", verbose=True):
    """SmoothGrad map(s): (H, W) for one label, (K, H, W) for several, at the image's size."""
    return gradient_maps(net, image, label, "smoothgrad", functools.partial(
        raw, samples=samples, noise_level=noise_level, random_state=random_state, batch_size=batch_size,
        verbose=verbose))
