"""The library's bicubic map resize (PIL's ``Image.resize(..., BICUBIC)`` on float images) as two
constant matrices: PIL's filter is separable and linear, so out = R_h @ map @ R_w^T exactly, with the
coefficients PIL computes (a = -0.5, pixel centres, the kernel widened when shrinking, weights
renormalised at the borders). Two MatMuls run on every opset and every execution provider."""
from __future__ import annotations

import functools

import numpy as np


def _bicubic(x: float, a: float = -0.5) -> float:
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


def pil_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float64: row i holds the weights PIL gives input pixels for output pixel i
    (``precompute_coeffs`` in PIL's Resample.c)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    matrix = np.zeros((out_size, in_size), np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        ss = 1.0 / filterscale
        xmin = max(int(center - support + 0.5), 0)  # C casts truncate toward zero
        xmax = min(int(center + support + 0.5), in_size) - xmin
        weights = [_bicubic((x + xmin - center + 0.5) * ss) for x in range(xmax)]
        total = sum(weights)
        for x, w in enumerate(weights):
            matrix[xx, xmin + x] = w / total if total != 0.0 else w
    return matrix


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
