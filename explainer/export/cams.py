"""Grad-CAM and Grad-CAM++ as graphs: the channel weights of ``explainer.gradcam`` and
``explainer.gradcam_plus_plus`` (explainer/methods/gradcam.py, gradcam_plus_plus.py) from the
gradient the head's differentiation emits, in the same order of operations."""
from __future__ import annotations

from . import exporter
from .context import ExportContext


def _unaveraged(ctx: ExportContext, g: str, acts: str) -> None:
    """For the library's refusal of maps at float32 noise level (``BaseCAM._refuse_degenerate``): the
    peak over locations of sum_c mean_hw|g| |A|, (N, K), as ``ctx.diagnostics["unaveraged"]``; only
    where asked (``ctx.diagnostics`` is a dict), never in exported files."""
    if ctx.diagnostics is None:
        return
    mean_abs = ctx.reduce("ReduceMean", ctx.node("Abs", [g]), [3, 4], keepdims=1)  # (K, N, C, 1, 1)
    summed = ctx.reduce("ReduceSum", ctx.node("Mul", [mean_abs, ctx.node("Abs", [acts])]), [2], keepdims=0)
    peak = ctx.reduce("ReduceMax", summed, [2, 3], keepdims=0)  # (K, N)
    ctx.diagnostics["unaveraged"] = ctx.node("Transpose", [peak], perm=[1, 0])


def _cam(ctx: ExportContext, weights: str, acts: str) -> str:
    """ReLU(sum_c w_c A_c): (K, N, C, 1, 1) weights, (N, C, h, w) activations → (N, K, h, w)."""
    summed = ctx.reduce("ReduceSum", ctx.node("Mul", [weights, acts]), [2], keepdims=0)  # (K, N, h, w)
    return ctx.node("Transpose", [ctx.node("Relu", [summed])], perm=[1, 0, 2, 3])


@exporter("gradcam")
def gradcam(ctx: ExportContext) -> str:
    """Channel weights: the spatial mean of the score's gradient (Selvaraju et al.)."""
    g = ctx.float32(ctx.gradient_chw())
    acts = ctx.float32(ctx.feature_chw())
    _unaveraged(ctx, g, acts)
    return _cam(ctx, ctx.reduce("ReduceMean", g, [3, 4], keepdims=1), acts)


@exporter("gradcam_plus_plus")
def gradcam_plus_plus(ctx: ExportContext) -> str:
    """w_c = sum_ij alpha_ij ReLU(g_ij), alpha = g^2 / (2 g^2 + sum_ab A_ab g^3 + 1e-6), 0 where g = 0."""
    g = ctx.float32(ctx.gradient_chw())
    acts = ctx.float32(ctx.feature_chw())
    _unaveraged(ctx, g, acts)
    g2 = ctx.node("Mul", [g, g])
    total = ctx.reduce("ReduceSum", acts, [2, 3], keepdims=1)  # (N, C, 1, 1)
    denominator = ctx.node("Add", [ctx.node("Add", [ctx.node("Mul", [ctx.scalar(2.0), g2]),
                                                    ctx.node("Mul", [ctx.node("Mul", [total, g2]), g])]),
                                   ctx.scalar(1e-6)])
    alpha = ctx.node("Div", [g2, denominator])
    # the library's where(g != 0, alpha, 0) is alpha itself: g = 0 gives 0 / 1e-6 = 0
    weights = ctx.reduce("ReduceSum", ctx.node("Mul", [ctx.node("Relu", [g]), alpha]), [3, 4], keepdims=1)
    return _cam(ctx, weights, acts)
