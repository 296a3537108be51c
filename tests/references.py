"""Independent references the tests compare with, in the units the library documents.

* ``raw_cam``: pytorch-grad-cam's own CAM (its weights, its weighted sum, its ReLU) with its min-max
  scaling switched off, so maps are compared in the feature layer's units: a CAM off by a constant
  factor (gradients summed instead of averaged) fails, where a comparison after rescaling passes.
* ``bicubic_upsample``: the upsampling the library documents for its maps (bicubic, Keys' kernel with
  a = -0.5 as MATLAB's ``imresize``, half-pixel centres, widened by the factor when shrinking, the
  kernel's weights renormalised where it reaches past the border), written out as two matrices.
* ``rescale``: MATLAB's ``rescale`` of a map to [0, 1], as the gradient methods document their maps.
"""
from __future__ import annotations

from unittest import mock

import numpy as np


def raw_cam(cam_class, model, module, x, target: int, batch_size: int | None = None,
            reshape_transform=None) -> np.ndarray:
    """(h, w) float32: pytorch-grad-cam's ``cam_class`` (GradCAM, GradCAMPlusPlus, ScoreCAM) on
    ``model`` at ``module`` for one image ``x`` (1, C, H, W) and class ``target``, unscaled: its
    ``scale_cam_image`` (min-max, then cv2's resize to the input) is replaced by the identity."""
    import pytorch_grad_cam.base_cam as base_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    def unscaled(cam, target_size=None):
        return np.float32(cam)

    if next(model.parameters(), None) is None:  # weights held as buffers (int8 graphs)
        model = _with_a_parameter(model)
    with mock.patch.object(base_cam, "scale_cam_image", unscaled):
        with cam_class(model=model, target_layers=[module], reshape_transform=reshape_transform) as cam:
            if batch_size is not None:
                cam.batch_size = batch_size
            # frozen weights: the graph is recorded only when the input asks for a gradient
            out = cam(input_tensor=x.detach().clone().requires_grad_(True), targets=[ClassifierOutputTarget(target)])
    assert out.ndim == 3 and out.shape[0] == 1, out.shape
    return out[0]


def vit_reshape(prefix: int, grid: tuple[int, int]):
    """pytorch-grad-cam's ``reshape_transform`` for ViT tokens (its tutorial's): (N, T, C) tokens less
    the ``prefix`` class tokens, laid on the ``grid`` as (N, C, h, w)."""

    def reshape(tokens):
        n, _, c = tokens.shape
        return tokens[:, prefix:, :].reshape(n, grid[0], grid[1], c).permute(0, 3, 1, 2)

    return reshape


def _with_a_parameter(model):
    """``model`` inside a module that has a parameter: pytorch-grad-cam reads its device from one."""
    import torch

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model
            device = next(iter(model.buffers()), torch.empty(0)).device
            self.placeholder = torch.nn.Parameter(torch.empty(0, device=device), requires_grad=False)

        def forward(self, x):
            return self.inner(x)

    return Wrapped()


def _keys(t: np.ndarray, a: float = -0.5) -> np.ndarray:
    t = np.abs(t)
    return np.where(t < 1, (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1,
                    np.where(t < 2, a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a, 0.0))


def _bicubic_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) weights: output pixel i's centre (i + 0.5) n_in / n_out against input pixel
    centres j + 0.5, Keys' kernel (widened by the factor when shrinking: the antialiasing), each row
    renormalised to sum 1 (the border's missing taps)."""
    scale = n_in / n_out
    centres = (np.arange(n_out) + 0.5) * scale
    w = _keys(((np.arange(n_in) + 0.5)[None, :] - centres[:, None]) / max(scale, 1.0))
    return w / w.sum(axis=1, keepdims=True)


def bicubic_upsample(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(..., h, w) maps resized to (..., H, W) = ``size`` with the documented filter (bicubic;
    antialiased where it shrinks), float64."""
    rows, cols = _bicubic_matrix(size[0], m.shape[-2]), _bicubic_matrix(size[1], m.shape[-1])
    return rows @ np.asarray(m, np.float64) @ cols.T


def rescale(m: np.ndarray) -> np.ndarray:
    """Each (H, W) map of (..., H, W) linearly to [0, 1]."""
    m = np.asarray(m, np.float64)
    lo = m.min(axis=(-2, -1), keepdims=True)
    hi = m.max(axis=(-2, -1), keepdims=True)
    return (m - lo) / (hi - lo)


def assert_close_in_units(ours, theirs, rtol: float = 1e-5, what: str = "map") -> float:
    """``ours`` equals ``theirs`` pointwise within ``rtol`` of the reference's largest magnitude (no
    rescaling on either side); returns the relative error."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    scale = float(np.abs(theirs).max())
    assert scale > 0, f"the reference {what} is zero everywhere: the comparison would prove nothing"
    error = float(np.abs(ours - theirs).max()) / scale
    assert error <= rtol, f"{what} differs from the reference by {error:.2e} of its largest value (allowed {rtol:.0e})"
    return error
