"""Grad-CAM and Grad-CAM++ as graphs: the channel weights of ``explainer.gradcam`` and
``explainer.gradcam_plus_plus`` (explainer/methods/gradcam.py, gradcam_plus_plus.py) from the
gradient the head's differentiation emits, in the same order of operations."""
from __future__ import annotations

import numpy as np

from . import exporter
from .context import ExportContext


def _unaveraged(ctx: ExportContext, g: str, acts: str, mean_abs: str | None = None) -> None:
    """For the library's refusal of maps at float32 noise level (``BaseCAM._refuse_degenerate``): the
    peak over locations of sum_c mean_hw|g| |A|, (N, K), as ``ctx.diagnostics["unaveraged"]``; only
    where asked (``ctx.diagnostics`` is a dict), never in exported files. ``mean_abs``: mean_hw|g|
    (K, N, C, 1, 1) where known without reading g (a gradient the same at every location)."""
    if ctx.diagnostics is None:
        return
    if mean_abs is None:
        mean_abs = ctx.reduce("ReduceMean", ctx.node("Abs", [g]), [3, 4], keepdims=1)  # (K, N, C, 1, 1)
    summed = _channel_sum(ctx, mean_abs, ctx.node("Abs", [acts]))  # (N, K, h*w)
    ctx.diagnostics["unaveraged"] = ctx.reduce("ReduceMax", summed, [2], keepdims=0)  # (N, K)


def _channel_sum(ctx: ExportContext, weights: str, acts: str) -> str:
    """sum_c w_c A_c as one batched MatMul: (K, N, C, 1, 1) weights, (N, C, h, w) activations →
    (N, K, h*w)."""
    c = ctx.layout.channels
    h, w = ctx.layout.grid
    by_image = ctx.node("Transpose", [ctx.reshape(weights, ctx.const(np.asarray([0, 0, c], np.int64), "kn_c"))],
                        perm=[1, 0, 2])  # (N, K, C)
    flat = ctx.reshape(acts, ctx.const(np.asarray([0, c, h * w], np.int64), "n_c_hw"))  # (N, C, h*w)
    return ctx.node("MatMul", [by_image, flat])


def _cam(ctx: ExportContext, weights: str, acts: str) -> str:
    """ReLU(sum_c w_c A_c): (K, N, C, 1, 1) weights, (N, C, h, w) activations → (N, K, h, w)."""
    h, w = ctx.layout.grid
    cam = ctx.node("Relu", [_channel_sum(ctx, weights, acts)])  # (N, K, h*w)
    return ctx.reshape(cam, ctx.const(np.asarray([0, 0, h, w], np.int64), "n_k_grid"))


@exporter("gradcam")
def gradcam(ctx: ExportContext) -> str:
    """Channel weights: the spatial mean of the score's gradient (Selvaraju et al.): where the gradient
    is spread evenly over the grid (a global average pool's), the tensor it was spread from, without
    the full (K, N, C, h, w) gradient."""
    acts = ctx.float32(ctx.feature_chw())
    g = ctx.gradient_chw()
    even = ctx.spatial_constant(g)
    if even is not None:
        weights = ctx.float32(even)
        _unaveraged(ctx, None, acts, mean_abs=ctx.node("Abs", [weights]) if ctx.diagnostics is not None else None)
        return _cam(ctx, weights, acts)
    g = ctx.float32(g)
    _unaveraged(ctx, g, acts)
    return _cam(ctx, ctx.reduce("ReduceMean", g, [3, 4], keepdims=1), acts)


@exporter("gradcam_plus_plus")
def gradcam_plus_plus(ctx: ExportContext) -> str:
    """w_c = sum_ij alpha_ij ReLU(g_ij), alpha = g^2 / (2 g^2 + sum_ab A_ab g^3 + 1e-6), 0 where g = 0.
    Where the gradient is the same at every location (a global average pool's), on the (K, N, C, 1, 1)
    tensor it was spread from, the sum over the grid being h*w times the one value."""
    acts = ctx.float32(ctx.feature_chw())
    even = ctx.spatial_constant(ctx.gradient_chw())
    if even is not None:
        g = ctx.float32(even)
        _unaveraged(ctx, None, acts, mean_abs=ctx.node("Abs", [g]) if ctx.diagnostics is not None else None)
    else:
        g = ctx.float32(ctx.gradient_chw())
        _unaveraged(ctx, g, acts)
    g2 = ctx.node("Mul", [g, g])
    total = ctx.reduce("ReduceSum", acts, [2, 3], keepdims=1)  # (N, C, 1, 1)
    denominator = ctx.node("Add", [ctx.node("Add", [ctx.node("Mul", [ctx.scalar(2.0), g2]),
                                                    ctx.node("Mul", [ctx.node("Mul", [total, g2]), g])]),
                                   ctx.scalar(1e-6)])
    alpha = ctx.node("Div", [g2, denominator])
    # the library's where(g != 0, alpha, 0) is alpha itself: g = 0 gives 0 / 1e-6 = 0
    per_location = ctx.node("Mul", [ctx.node("Relu", [g]), alpha])
    if even is not None:
        h, w = ctx.layout.grid
        weights = ctx.node("Mul", [per_location, ctx.scalar(float(h * w))])
    else:
        weights = ctx.reduce("ReduceSum", per_location, [3, 4], keepdims=1)
    return _cam(ctx, weights, acts)
