"""What the attention methods share: the attention probabilities of a class-token vision transformer,
found in the graph's data flow (``net.structure.attention``: a Softmax of a product whose two operands
both depend on the image), in the order the blocks run, with the token layout the class score reads
(how many prefix tokens, the patch grid).

Each block's attention is one of three kinds, told by its shape per image (heads, queries, keys), with
T = prefix + P tokens and P = h*w patches:

- ``"self"`` (T x T): every token attends over all tokens (ViT, DeiT);
- ``"patches"`` (P x P): self-attention over the patch tokens only, the class token not yet in the
  stream (CaiT's talking-heads blocks: Touvron et al., "Going deeper with Image Transformers", ICCV
  2021); the class token passes such a block unchanged;
- ``"class"`` (1 x T): class attention, only the class token (token 0) attends, over [class, patches]
  (CaiT's last blocks); the patch tokens pass such a block unchanged.

``embed`` writes any of them as a (T x T) matrix over all tokens, the tokens a block leaves unchanged
given a row of their own (attending to themselves only for rollout, no mixing for Chefer's update), so
that every method follows all three kinds with the same product as ViT's.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import UnsupportedModelError

if TYPE_CHECKING:
    from ..runtime.classifier import Classifier


SELF, PATCHES, CLASS = "self", "patches", "class"


@dataclass(frozen=True)
class Attention:
    """``softmaxes``: the probability tensors (tensor names, in graph order), each (heads, queries, keys)
    per image as its kind in ``kinds`` says; ``prefix``: the class (and distillation) tokens before the
    ``grid`` of patch tokens, T = prefix + h*w."""

    softmaxes: tuple[str, ...]
    tokens: int
    prefix: int
    grid: tuple[int, int]
    kinds: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.kinds:
            object.__setattr__(self, "kinds", (SELF,) * len(self.softmaxes))

    def shape(self, kind: str) -> tuple[int, int]:
        """(queries, keys) of a block of ``kind``."""
        patches = self.tokens - self.prefix
        return {SELF: (self.tokens, self.tokens), PATCHES: (patches, patches), CLASS: (1, self.tokens)}[kind]


def embed(values, kind: str, prefix: int, tokens: int, diagonal: float):
    """(..., T, T) from a block's (..., queries, keys) ``values`` (numpy or torch, float64): the rows of
    the tokens the block updates hold its values, the rows of those it leaves unchanged ``diagonal`` on
    the diagonal (1: the token attends to itself only; 0: no update)."""
    if kind == SELF:
        return values
    lead = tuple(values.shape[:-2])
    if hasattr(values, "new_zeros"):  # torch
        import torch

        out = values.new_zeros(lead + (tokens, tokens))
        eye = torch.eye(tokens, dtype=values.dtype, device=values.device)
    else:
        out = np.zeros(lead + (tokens, tokens), dtype=values.dtype)
        eye = np.eye(tokens, dtype=values.dtype)
    if kind == PATCHES:
        out[..., :prefix, :prefix] = eye[:prefix, :prefix] * diagonal
        out[..., prefix:, prefix:] = values
    else:  # CLASS: token 0 attends over all tokens; the others (patches, distillation token) unchanged
        out[..., 1:, 1:] = eye[1:, 1:] * diagonal
        out[..., :1, :] = values
    return out


#: net -> its Attention (or the error's message): finding them reads the layouts, which measures shapes
_FOUND: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def self_attention(net: Classifier, where: str) -> Attention:
    """``_find``'s answer, remembered per classifier (the same graph gives the same attention)."""
    found = _FOUND.get(net)
    if found is None:
        try:
            found = _find(net)
        except UnsupportedModelError as exc:
            found = str(exc)
        _FOUND[net] = found
    if isinstance(found, str):
        raise UnsupportedModelError(f"{where}: {found}")
    return found


def attention_softmaxes(net: Classifier) -> list:
    """The layers holding attention probabilities (a Softmax of ``net.structure.attention``), in graph order."""
    return [l for l in net.layers() if l.op_type == "Softmax" and l.output in net.structure.attention]


def _find(net: Classifier) -> Attention:
    """The self-attention probabilities of every block, or ``UnsupportedModelError`` saying why the
    model has none the methods can follow: a CNN; a model reading no class token (Swin and LeViT pool
    their tokens: their window attention never mixes the whole image in one block); attention of
    another shape than the three kinds; no block through which the class token reads the patches."""
    from ..runtime.feature_layers import gradcam_layers

    found = attention_softmaxes(net)
    if not found:
        raise UnsupportedModelError(
            f"model {net.name!r} has no attention (no Softmax over a product of two image-dependent "
            "tensors): attention methods explain transformers; use gradcam, occlusion or rise.")
    layout = net.layout(gradcam_layers(net).feature)
    if layout is None or layout.kind != "tokens" or layout.prefix < 1:
        raise UnsupportedModelError(
            f"model {net.name!r} reads no class token (its score pools a grid of tokens: "
            f"{getattr(layout, 'kind', 'a feature map')}), so there is no class-token row of attention to "
            "follow (Swin and LeViT attend within windows or pooled stages); use gradcam or rise.")
    patches = layout.grid[0] * layout.grid[1]
    tokens = layout.prefix + patches
    by_shape = {(tokens, tokens): SELF, (patches, patches): PATCHES, (1, tokens): CLASS}
    kinds = [by_shape.get(tuple(l.shape[-2:])) if l.shape is not None and len(l.shape) >= 2 else None
             for l in found]
    odd = [(l.name, l.shape) for l, kind in zip(found, kinds) if kind is None]
    if odd:
        name, shape = odd[0]
        raise UnsupportedModelError(
            f"model {net.name!r}: attention {name!r} has shape {shape}, not ({tokens} x {tokens}) over all "
            f"{tokens} tokens, ({patches} x {patches}) over the patches only, or (1 x {tokens}) of the "
            "class token, the three kinds of block the attention methods follow; use gradcam or rise.")
    if not {SELF, CLASS} & set(kinds):
        raise UnsupportedModelError(
            f"model {net.name!r}: no attention block reads the patches into the class token (all "
            f"{len(found)} attend over the patches only), so the class token's row has no attention to "
            "follow; use gradcam or rise.")
    return Attention(tuple(l.output for l in found), tokens, layout.prefix, tuple(layout.grid), tuple(kinds))
