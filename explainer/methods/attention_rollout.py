"""Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020): how much
of what the class token carries after the last block flows from each patch, following every block's
attention with its residual connection. Forward-only: the attention probabilities are extra outputs of
one onnxruntime pass.

Per block, the heads' attention (heads, T, T) is fused (mean, max or min over heads); the lowest
``discard_ratio`` of its T*T entries are set to 0 (never the class token's attention to itself), as in
jacobgil/vit-explain; the residual connection adds the identity, A' = (A + I) / 2, each row renormalised
to sum 1; the rollout is the product A'_L ... A'_1. The class token's row over the patch tokens,
laid out on the patch grid, is the map: a fraction of the class token's input, class-agnostic.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ._attention import self_attention
from ._common import MapMethod
from .registry import FORWARD_ONLY, Choice, Float, method

if TYPE_CHECKING:
    from ..runtime.classifier import Classifier

HEAD_FUSIONS = ("mean", "max", "min")


def rollout(attentions: list[np.ndarray], head_fusion: str = "mean", discard_ratio: float = 0.0) -> np.ndarray:
    """(T, T) rollout of one image's per-block attention probabilities, each (heads, T, T)."""
    eye = np.eye(attentions[0].shape[-1])
    result = eye.copy()
    for attention in attentions:
        result = _step(attention, head_fusion, discard_ratio) @ result
    return result


def class_row(attentions: list[np.ndarray], head_fusion: str = "mean", discard_ratio: float = 0.0) -> np.ndarray:
    """Row 0 of ``rollout`` (the class token's), as a vector times the blocks from the last to the first:
    T^2 per block instead of a T^3 product of matrices."""
    row = np.zeros(attentions[0].shape[-1])
    row[0] = 1.0
    for attention in reversed(attentions):
        row = row @ _step(attention, head_fusion, discard_ratio)
    return row


def _step(attention: np.ndarray, head_fusion: str, discard_ratio: float) -> np.ndarray:
    """One block's (A + I) / 2 from its heads (heads, T, T), the lowest entries discarded first, rows
    renormalised to sum 1."""
    fused = getattr(np, head_fusion)(attention.astype(np.float64), axis=0)
    if discard_ratio > 0:
        flat = fused.reshape(-1)  # a view: the entries dropped are dropped from ``fused``
        lowest = np.argsort(flat, kind="stable")[:int(flat.size * discard_ratio)]  # ties: the first ones
        flat[lowest[lowest != 0]] = 0.0
    a = fused
    a[np.diag_indices_from(a)] += 1.0
    a /= 2.0
    a /= a.sum(axis=-1, keepdims=True)
    return a


@method("attention_rollout", kind=FORWARD_ONLY,
        options=dict(head_fusion=Choice(HEAD_FUSIONS, help="how each block's heads combine"),
                     discard_ratio=Float(0.0, 1.0, help="the fraction of each block's lowest attention "
                                                        "entries set to 0 before the rollout (0.9 sharpens)")),
        answers="which patches the class token's information flows from, through every block's attention "
                "and residual connection (class-agnostic)",
        returns="maps at the image's size: the class token's rolled-out attention to each patch (a fraction "
                "of its input; the same map for every label)",
        cost="one forward pass per image (the attention probabilities as extra outputs)",
        reference="jacobgil/vit-explain's rollout on the timm model (test)", order=120)
def attention_rollout(net: Classifier, image, label, *, head_fusion="mean", discard_ratio=0.0):
    """Rollout map(s): (H, W) for one label, (K, H, W) for several (one map, repeated: rollout does not
    depend on the class); ViT and DeiT-style models (a class token, self-attention over all tokens)."""
    return Rollout(net, head_fusion=head_fusion, discard_ratio=discard_ratio)(image, label)


class Rollout(MapMethod):
    where = "attention_rollout"
    class_agnostic = True

    def explain_all(self, pixels, indices):  # the images in one batch: one forward pass
        found = self_attention(self.net, self.where)
        x = self.net.to_model_input(np.stack([self.net.fit_pixels(p) for p in pixels]))
        probs = self.net.ort.run_batched(x, list(found.softmaxes), self.net.batch_size)
        for i in range(len(pixels)):
            row = class_row([np.asarray(a[i]).reshape(-1, found.tokens, found.tokens) for a in probs],
                            self.head_fusion, self.discard_ratio)
            yield row[found.prefix:].reshape(1, *found.grid).astype(np.float32)
