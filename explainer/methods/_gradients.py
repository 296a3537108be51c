"""What the gradient methods share: class gradients on the converted module (guided or not) and their
maps. Each gradient method is its own file (``saliency.py``, ``guided_backprop.py``,
``integrated_gradients.py``, ``smoothgrad.py``) and defines ``raw(engine, x, indices, **options)``, the
per-pixel, per-channel attributions (K, C, H, W) of one image, comparable with Captum's Saliency,
GuidedBackprop, IntegratedGradients and NoiseTunnel on ``torch_engine(net).pixel_model``; maps are the
sum over channels of |attribution|, rescaled to [0, 1] per map (``gradient_maps``)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from ..runtime.torch_engine import torch_engine
from ._common import MapMethod, rescale

if TYPE_CHECKING:
    from ..runtime.classifier import Classifier


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


class GradientMaps(MapMethod):
    """Maps from ``raw(engine, x, indices)`` (attributions (K, C, H, W) of one image at its own size):
    per image, the sum over channels of |attribution|, rescaled to [0, 1] per map."""

    def setup(self, pixels, indices):
        self.engine = torch_engine(self.net)

    def explain(self, pixels, indices):
        attributions = self.raw(self.engine, self.engine.tensor(pixels).permute(2, 0, 1)[None], indices)
        return rescale(np.abs(attributions.cpu().numpy()).sum(axis=1))


def gradient_maps(net: Classifier, image, label, where: str, raw) -> np.ndarray:
    """``GradientMaps``: (H, W), (K, H, W), or one per image of a batch."""
    return GradientMaps(net, where=where, raw=raw)(image, label)
