"""The library's bicubic map resize (PIL's ``Image.resize(..., BICUBIC)`` on float images) as two
constant matrices: PIL's filter is separable and linear, so out = R_h @ map @ R_w^T exactly, with the
coefficients PIL computes (``explainer/model/bicubic.py``: a = -0.5, pixel centres, the kernel widened
when shrinking, weights renormalised at the borders). Two MatMuls run on every opset and every execution
provider."""
from __future__ import annotations

import functools

import numpy as np

from ..model.bicubic import pil_bicubic_matrix

__all__ = ["pil_bicubic_matrix", "resize_maps", "upsample"]


def resize_maps(ctx, maps: str, size: tuple[int, int], grid: tuple[int, int]) -> str:
    """(N, K, h, w) → (N, K, H, W) with PIL's bicubic weights (unclipped)."""
    (height, width), (h, w) = size, grid
    if (h, w) == (height, width):
        return maps
    rows = ctx.const(pil_bicubic_matrix(h, height).astype(np.float32), "resize_rows")  # (H, h)
    cols = ctx.const(pil_bicubic_matrix(w, width).T.astype(np.float32), "resize_cols")  # (w, W)
    horizontal = ctx.node("MatMul", [maps, cols])  # PIL's horizontal pass first
    return ctx.node("MatMul", [rows, horizontal])


@functools.lru_cache(maxsize=64)
def _matrix(size_in: int, size_out: int, transposed: bool) -> np.ndarray:
    m = pil_bicubic_matrix(size_in, size_out).astype(np.float32)
    m = np.ascontiguousarray(m.T if transposed else m)
    m.flags.writeable = False
    return m


def upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(K, h, w) float maps → (K, H, W) float32: the library's bicubic resize of maps
    (``explainer.model.preprocess.resize_map``: PIL, unclipped) as map @ cols then rows @ that, with
    PIL's coefficients kept per size: equal to PIL's within 1e-6 of the map's range (float32 sums in
    another order), without a PIL image per map."""
    (height, width), (h, w) = size, maps.shape[-2:]
    maps = np.asarray(maps, np.float32)
    if w != width:
        maps = maps @ _matrix(w, width, True)  # PIL's horizontal pass first
    if h != height:
        maps = _matrix(h, height, False) @ maps
    return maps
