"""What the gradient methods share, and MATLAB's ``gradientAttribution`` entry point.

Each gradient method is its own file and registered method: ``saliency.py`` ("gradient", MATLAB's
"autodiff"), ``guided_backprop.py``, ``integrated_gradients.py`` and ``smoothgrad.py``. Each defines
``raw(engine, x, indices, **options)``, the per-pixel, per-channel attributions (K, C, H, W) of one
image, comparable with Captum's Saliency, GuidedBackprop, IntegratedGradients and NoiseTunnel on
``torch_engine(net).pixel_model``; maps are the sum over channels of |attribution|, rescaled to [0, 1]
per map. ``gradient_attribution(method=...)`` and ``pixel_attributions`` dispatch to them.
"""
from __future__ import annotations

import importlib
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InvalidParameterError
from ..runtime.torch_engine import torch_engine
from ..validation import check_choice
from ._common import finish, images_and_labels, rescale

if TYPE_CHECKING:
    from ..runtime.classifier import Classifier

#: MATLAB's method names (``gradientAttribution``'s "autodiff" and "guided-backprop") → registered methods
METHODS = {"autodiff": "gradient", "guided-backprop": "guided_backprop", "integrated-gradients": "integrated_gradients",
           "smoothgrad": "smoothgrad"}


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


def class_gradients(engine, x, indices, guided: bool = False):
    """d score[k] / d x for a batch x (B, C, H, W) whose row b targets class indices[b]."""
    import torch

    x = x.detach().clone().requires_grad_(True)
    with engine.exclusive(), torch.enable_grad(), (guided_relus(engine.graph_module) if guided else _nothing()):
        out = engine.pixel_model(x)
        target = out[torch.arange(len(x), device=x.device), torch.as_tensor(indices, device=x.device)].sum()
        return torch.autograd.grad(target, x)[0]


@contextmanager
def _nothing():
    yield


def gradient_maps(net: Classifier, image, label, where: str, raw) -> np.ndarray:
    """Maps from ``raw(engine, x, indices)``: per image, the sum over channels of |attribution|,
    rescaled to [0, 1] per map; (H, W), (K, H, W), or one per image of a batch."""
    pixels, is_batch, indices, several = images_and_labels(net, image, label, where)
    engine = torch_engine(net)
    maps = []
    for p in pixels:
        attributions = raw(engine, engine.tensor(p).permute(2, 0, 1)[None], indices)
        maps.append(rescale(np.abs(attributions.cpu().numpy()).sum(axis=1)))
    return finish(maps, is_batch, several, where)


def _dispatch(method: str, options: dict, where: str):
    """(the registered method, the options it takes), every given option validated, also those the
    chosen method does not use."""
    from .registry import get_method

    check_choice(where, "method", method, tuple(METHODS))
    target = get_method(METHODS[method])
    declared = {}
    for name in METHODS.values():
        declared.update(get_method(name).options)
    for name, value in options.items():
        declared[name].check(where, value)
    return target, {k: v for k, v in options.items() if k in target.options}


def gradient_attribution(net: Classifier, image, label, *, method="autodiff", steps=50, rule="gausslegendre",
                         baseline=None, samples=25, noise_level=0.15, random_state=None,
                         batch_size="auto", verbose=True):
    """Pixel attribution map(s): (H, W) for one label, (K, H, W) for several, at the image's size;
    values are the sum over channels of |attribution|, rescaled to [0, 1] per map.

    method: "autodiff" (d score / d pixel; score = class score before any softmax),
    "guided-backprop" (ReLUs pass back only positive gradients), "integrated-gradients" (``steps``,
    ``rule``, ``baseline``: a pixel value or an image, default black), "smoothgrad" (``samples``
    noisy copies, noise std ``noise_level`` x 255, ``random_state`` for reproducibility). The same as
    the registered methods "gradient", "guided_backprop", "integrated_gradients" and "smoothgrad".
    """
    target, options = _dispatch(method, dict(steps=steps, rule=rule, baseline=baseline, samples=samples,
                                             noise_level=noise_level, random_state=random_state,
                                             batch_size=batch_size, verbose=verbose), "gradient_attribution")
    return target(net, image, label, **options)


def pixel_attributions(net: Classifier, image, label, *, method="autodiff", steps=50, rule="gausslegendre",
                       baseline=None, samples=25, noise_level=0.15, random_state=None,
                       batch_size="auto", verbose=False):
    """Raw attributions (K, C, H, W) float32 for one image (H x W its own size; C its channels)."""
    where = "pixel_attributions"
    target, options = _dispatch(method, dict(steps=steps, rule=rule, baseline=baseline, samples=samples,
                                             noise_level=noise_level, random_state=random_state,
                                             batch_size=batch_size, verbose=verbose), where)
    options = target.validate(net, options, where)
    pixels, is_batch, indices, _ = images_and_labels(net, image, label, where)
    if is_batch:
        raise InvalidParameterError(f"{where}: takes one image; got a batch.")
    engine = torch_engine(net)
    raw = importlib.import_module(target.function.__module__).raw
    x = engine.tensor(pixels[0]).permute(2, 0, 1)[None]
    return raw(engine, x, indices, **options).cpu().numpy().astype(np.float32)
