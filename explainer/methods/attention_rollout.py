"""Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020): how much
of what the class token carries after the last block flows from each patch, following every block's
attention with its residual connection. Forward-only: the attention probabilities are extra outputs of
one onnxruntime pass.

Per block, the heads' attention (heads, T, T) is fused (mean, max or min over heads); the lowest
``discard_ratio`` of its T*T entries are set to 0 (never the class token's attention to itself), as in
jacobgil/vit-explain; the residual connection adds the identity, A' = (A + I) / 2, each row renormalised
to sum 1 (``normalisation="vit-explain"`` divides as that repository's ``a / a.sum(dim=-1)`` broadcasts:
column j by row j's sum, which differs once entries are discarded or heads fused by max or min); the
rollout is the product A'_L ... A'_1. The class token's row over the patch tokens,
laid out on the patch grid, is the map: a fraction of the class token's input, class-agnostic.

CaiT (Touvron et al., ICCV 2021) has two kinds of block (``explainer/methods/_attention.py``): its
self-attention blocks attend over the P patch tokens only (talking heads: the heads' scores mixed
before the Softmax and its probabilities after it; the rollout follows the Softmax's probabilities,
the distributions over keys, as for every model), and the class token, a learned parameter that no
image reaches, joins only at its class-attention blocks, where it alone attends over [class, patches]
(1 x T) and the patches pass unchanged. Each block is written over all T tokens, the tokens it leaves
unchanged attending to themselves only, and then treated as ViT's: so the self-attention blocks roll
out to a (P x P) patch-to-patch matrix, and each class-attention block sets the class token's row to
((a + e_class) / 2) times the rows of the stream, a its fused attention row: the class token's previous
row (e_class at first: no image in it) mixed with the patches' rolled-out rows. The map is the class
row over the patches. ``discard_ratio`` drops the lowest entries of each block's own attention (P*P of
a self-attention block, where there is no class token to keep; the 1 + P of a class-attention row,
never the class token's attention to itself).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ._attention import PATCHES, SELF, embed, self_attention
from ._common import MapMethod
from .registry import FORWARD_ONLY, Choice, Float, method

if TYPE_CHECKING:
    from ..runtime.classifier import Classifier

HEAD_FUSIONS = ("mean", "max", "min")


NORMALISATIONS = ("rows", "vit-explain")


def rollout(attentions: list[np.ndarray], head_fusion: str = "mean", discard_ratio: float = 0.0,
            normalisation: str = "rows", kinds=None, prefix: int = 1) -> np.ndarray:
    """(T, T) rollout of one image's per-block attention probabilities, each (heads, queries, keys) of
    its kind in ``kinds`` (``_attention``'s "self", "patches" or "class"; all "self" by default:
    (heads, T, T)); ``prefix``: the tokens before the patches."""
    kinds = kinds or (SELF,) * len(attentions)
    tokens = _tokens(attentions, kinds, prefix)
    result = np.eye(tokens)
    for attention, kind in zip(attentions, kinds):
        result = _step(attention, head_fusion, discard_ratio, normalisation, kind, prefix, tokens) @ result
    return result


def class_rows(attentions: list[np.ndarray], head_fusion: str = "mean", discard_ratio: float = 0.0,
               normalisation: str = "rows", kinds=None, prefix: int = 1) -> np.ndarray:
    """Row 0 of ``rollout`` (the class token's) for a batch: ``attentions`` each (B, heads, queries, keys)
    → (B, T), a vector times the blocks from the last to the first (T^2 per block, not a T^3 product)."""
    kinds = kinds or (SELF,) * len(attentions)
    tokens = _tokens(attentions, kinds, prefix)
    row = np.zeros((attentions[0].shape[0], tokens))
    row[:, 0] = 1.0
    for attention, kind in zip(reversed(attentions), reversed(kinds)):
        row = np.einsum("bt,bts->bs", row, _step(attention, head_fusion, discard_ratio, normalisation, kind,
                                                 prefix, tokens))
    return row


def _tokens(attentions, kinds, prefix: int) -> int:
    return attentions[0].shape[-1] + (prefix if kinds[0] == PATCHES else 0)


def _step(attention: np.ndarray, head_fusion: str, discard_ratio: float, normalisation: str, kind: str = SELF,
          prefix: int = 1, tokens: int | None = None) -> np.ndarray:
    """One block's (A + I) / 2 from its heads (..., heads, queries, keys) → (..., T, T), the lowest entries
    of each image's fused attention discarded first (never the class token's to itself), written over
    all T tokens (``_attention.embed``: the tokens the block leaves unchanged attend to themselves), then
    renormalised: each row to sum 1 ("rows"), or as vit-explain's ``a / a.sum(dim=-1)`` broadcasts,
    column j divided by row j's sum ("vit-explain")."""
    fused = getattr(np, head_fusion)(attention.astype(np.float64), axis=-3)
    size = fused.shape[-2] * fused.shape[-1]
    if discard_ratio > 0:
        flat = fused.reshape(-1, size)  # a view: the entries dropped are dropped from ``fused``
        lowest = np.argsort(flat, axis=1, kind="stable")[:, :int(size * discard_ratio)]  # ties: first
        # never the class token's attention to itself (entry 0 of a self- or class-attention block; a
        # block over the patches only has no class token)
        kept = lowest == 0 if kind != PATCHES else np.zeros(lowest.shape, dtype=bool)
        rows = np.broadcast_to(np.arange(len(flat))[:, None], lowest.shape)
        flat[rows[~kept], lowest[~kept]] = 0.0
    a = embed(fused, kind, prefix, tokens or fused.shape[-1], diagonal=1.0)
    tokens = a.shape[-1]
    a[..., np.arange(tokens), np.arange(tokens)] += 1.0
    a /= 2.0
    sums = a.sum(axis=-1)
    a /= sums[..., :, None] if normalisation == "rows" else sums[..., None, :]
    return a


@method("attention_rollout", kind=FORWARD_ONLY,
        options=dict(head_fusion=Choice(HEAD_FUSIONS, help="how each block's heads combine"),
                     discard_ratio=Float(0.0, 1.0, help="the fraction of each block's lowest attention "
                                                        "entries set to 0 before the rollout (0.9 sharpens)"),
                     normalisation=Choice(NORMALISATIONS, help="rows: each step's rows sum to 1 (Abnar & "
                                          "Zuidema); vit-explain: as jacobgil/vit-explain divides (column j "
                                          "by row j's sum), to reproduce its figures")),
        answers="which patches the class token's information flows from, through every block's attention "
                "and residual connection (class-agnostic)",
        returns="maps at the image's size: the class token's rolled-out attention to each patch (a fraction "
                "of its input; the same map for every label)",
        cost="one forward pass per image (the attention probabilities as extra outputs)",
        reference="jacobgil/vit-explain's rollout on the timm model (test)", order=120)
def attention_rollout(net: Classifier, image, label, *, head_fusion="mean", discard_ratio=0.0, normalisation="rows"):
    """Rollout map(s): (H, W) for one label, (K, H, W) for several (one map, repeated: rollout does not
    depend on the class); ViT, DeiT and CaiT-style models (a class token; self-attention over all
    tokens or over the patches, class attention)."""
    return Rollout(net, head_fusion=head_fusion, discard_ratio=discard_ratio, normalisation=normalisation)(image, label)


class Rollout(MapMethod):
    where = "attention_rollout"
    class_agnostic = True

    def explain_all(self, pixels, indices):  # the images in one batch: one forward pass
        found = self_attention(self.net, self.where)
        x = self.net.to_model_input(np.stack([self.net.fit_pixels(p) for p in pixels]))
        probs = self.net.ort.run_batched(x, list(found.softmaxes), self.net.batch_size)
        rows = class_rows([np.asarray(a).reshape(len(pixels), -1, *found.shape(kind))
                           for a, kind in zip(probs, found.kinds)],
                          self.head_fusion, self.discard_ratio, self.normalisation, found.kinds, found.prefix)
        for row in rows:
            yield row[found.prefix:].reshape(1, *found.grid).astype(np.float32)
