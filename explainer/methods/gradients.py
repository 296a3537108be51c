"""Gradient attribution on the converted module: plain gradients ("autodiff", MATLAB's
``gradientAttribution``), guided backpropagation, integrated gradients and SmoothGrad.

``pixel_attributions`` gives the raw per-pixel, per-channel attributions (comparable with Captum's
Saliency, GuidedBackprop, IntegratedGradients and NoiseTunnel on ``torch_engine(net).pixel_model``);
``gradient_attribution`` reduces them to maps: the sum over channels of absolute values, rescaled to
[0, 1] per map.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from ..errors import InvalidParameterError
from ..model.torch_engine import torch_engine
from ..validation import check_batch_size, check_choice, check_float, check_int
from ._common import finish, images_and_labels, rescale

METHODS = ("autodiff", "guided-backprop", "integrated-gradients", "smoothgrad")
IG_RULES = ("gausslegendre", "riemann_trapezoid")
DEFAULT_BATCH = 16


@contextmanager
def guided_relus(module):
    """Guided backpropagation: every ReLU of ``module`` passes back only positive gradients (ReLU's own
    backward already zeroes them at negative inputs); so does every QuantizeLinear into which a
    quantizer folded a ReLU. Hooks are removed on exit, error or not."""
    import torch

    handles = []
    try:
        for m in module.modules():
            if isinstance(m, torch.nn.ReLU) or getattr(m, "rectifies", False):
                handles.append(m.register_full_backward_hook(
                    lambda mod, grad_in, grad_out: (torch.clamp(grad_in[0], min=0.0), *grad_in[1:])))
        yield
    finally:
        for h in handles:
            h.remove()


def _gradients(engine, x, indices, guided: bool):
    """d score[k] / d x for a batch x (B, C, H, W) whose row b targets class indices[b]."""
    import torch

    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        if guided:
            with guided_relus(engine.graph_module):
                out = engine.pixel_model(x)
                target = out[torch.arange(len(x), device=x.device), torch.as_tensor(indices, device=x.device)].sum()
                return torch.autograd.grad(target, x)[0]
        out = engine.pixel_model(x)
        target = out[torch.arange(len(x), device=x.device), torch.as_tensor(indices, device=x.device)].sum()
        return torch.autograd.grad(target, x)[0]


def _ig_rule(steps: int, rule: str):
    if rule == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return 0.5 * (nodes + 1), 0.5 * weights
    alphas = np.linspace(0.0, 1.0, steps)
    weights = np.full(steps, 1.0 / (steps - 1))
    weights[[0, -1]] *= 0.5
    return alphas, weights


def _check(method, steps, rule, samples, noise_level, batch_size):
    where = "gradient_attribution"
    check_choice(where, "method", method, METHODS)
    steps = check_int(where, "steps", steps, minimum=2, maximum=100_000)
    check_choice(where, "rule", rule, IG_RULES)
    samples = check_int(where, "samples", samples, minimum=1, maximum=100_000)
    noise_level = check_float(where, "noise_level", noise_level, minimum=0.0, maximum=10.0)
    batch = check_batch_size(where, batch_size)
    return steps, samples, noise_level, DEFAULT_BATCH if batch == "auto" else batch


def pixel_attributions(net, image, label, *, method="autodiff", steps=50, rule="gausslegendre",
                       baseline=None, samples=25, noise_level=0.15, random_state=None,
                       batch_size="auto", verbose=False):
    """Raw attributions (K, C, H, W) float32 for one image (H x W its own size; C its channels)."""
    steps, samples, noise_level, batch = _check(method, steps, rule, samples, noise_level, batch_size)
    pixels, is_batch, indices, _ = images_and_labels(net, image, label, "gradient_attribution")
    if is_batch:
        raise InvalidParameterError("pixel_attributions: takes one image; got a batch.")
    return _attribute(torch_engine(net), pixels[0], indices, method, steps, rule, baseline, samples,
                      noise_level, random_state, batch, verbose)


def _attribute(engine, pixels, indices, method, steps, rule, baseline, samples, noise_level,
               random_state, batch, verbose):
    import torch
    from tqdm.auto import tqdm

    x = engine.tensor(pixels).permute(2, 0, 1)[None]
    k = len(indices)
    if method in ("autodiff", "guided-backprop"):
        grads = _gradients(engine, x.repeat(k, 1, 1, 1), indices, method == "guided-backprop")
        return grads.cpu().numpy().astype(np.float32)
    if method == "integrated-gradients":
        base = _baseline(baseline, x)
        alphas, weights = _ig_rule(steps, rule)
        total = torch.zeros((k, *x.shape[1:]), dtype=torch.float64, device=x.device)
        jobs = [(a, w, j) for a, w in zip(alphas, weights) for j in range(k)]
        for start in tqdm(range(0, len(jobs), batch), desc="integrated gradients", disable=not verbose):
            part = jobs[start:start + batch]
            xs = torch.cat([base + float(a) * (x - base) for a, _, _ in part])
            g = _gradients(engine, xs, [indices[j] for _, _, j in part], False).double()
            for (a, w, j), gi in zip(part, g):
                total[j] += w * gi
        return ((x - base).double() * total).cpu().numpy().astype(np.float32)
    # smoothgrad: mean over noisy copies of |gradient| (Captum: NoiseTunnel(Saliency) with abs=True)
    seed = int(random_state) if isinstance(random_state, (int, np.integer)) else \
        int(np.random.SeedSequence().generate_state(1)[0])
    generator = torch.Generator().manual_seed(seed)
    # drawn on the CPU generator, so CPU and GPU runs with the same seed see the same noise
    noise = torch.normal(0.0, noise_level * 255.0, size=(samples, *x.shape[1:]), generator=generator).to(x.device)
    total = torch.zeros((k, *x.shape[1:]), dtype=torch.float64, device=x.device)
    jobs = [(s, j) for j in range(k) for s in range(samples)]
    for start in tqdm(range(0, len(jobs), batch), desc="smoothgrad", disable=not verbose):
        part = jobs[start:start + batch]
        xs = torch.stack([x[0] + noise[s] for s, _ in part])
        g = _gradients(engine, xs, [indices[j] for _, j in part], False).abs().double()
        for (s, j), gi in zip(part, g):
            total[j] += gi
    return (total / samples).cpu().numpy().astype(np.float32)


def _baseline(baseline, x):
    import torch

    if baseline is None:
        return torch.zeros_like(x)
    if isinstance(baseline, (int, float)):
        return torch.full_like(x, float(baseline))
    from ..io import to_pixels

    b = to_pixels(baseline, "baseline")
    if b.shape[:2] != tuple(x.shape[-2:]):
        raise InvalidParameterError(
            f"gradient_attribution: baseline must be a number (pixel value 0..255) or an image of the "
            f"same size as the image {tuple(x.shape[-2:])}; got size {b.shape[:2]}.")
    return torch.from_numpy(b).to(x.device).permute(2, 0, 1)[None].expand_as(x).clone()


def gradient_attribution(net, image, label, *, method="autodiff", steps=50, rule="gausslegendre",
                         baseline=None, samples=25, noise_level=0.15, random_state=None,
                         batch_size="auto", verbose=True):
    """Pixel attribution map(s): (H, W) for one label, (K, H, W) for several, at the image's size;
    values are the sum over channels of |attribution|, rescaled to [0, 1] per map.

    method: "autodiff" (d score / d pixel; score = class score before any softmax),
    "guided-backprop" (ReLUs pass back only positive gradients), "integrated-gradients" (``steps``,
    ``rule``, ``baseline``: a pixel value or an image, default black), "smoothgrad" (``samples``
    noisy copies, noise std ``noise_level`` x 255, ``random_state`` for reproducibility).
    """
    where = "gradient_attribution"
    steps, samples, noise_level, batch = _check(method, steps, rule, samples, noise_level, batch_size)
    pixels, is_batch, indices, several = images_and_labels(net, image, label, where)
    engine = torch_engine(net)
    maps = []
    for p in pixels:
        raw = _attribute(engine, p, indices, method, steps, rule, baseline, samples, noise_level,
                         random_state, batch, verbose)
        maps.append(rescale(np.abs(raw).sum(axis=1)))
    return finish(maps, is_batch, several, where)
