"""What the attention methods share: the attention probabilities of a class-token vision transformer,
found in the graph's data flow (``net.structure.attention``: a Softmax of a product whose two operands
both depend on the image), in the order the blocks run, with the token layout the class score reads
(how many prefix tokens, the patch grid)."""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import UnsupportedModelError

if TYPE_CHECKING:
    from ..runtime.classifier import Classifier


@dataclass(frozen=True)
class Attention:
    """``softmaxes``: the probability tensors (tensor names, in graph order), each (heads, T, T) per image;
    ``prefix``: the class (and distillation) tokens before the ``grid`` of patch tokens, T = prefix + h*w."""

    softmaxes: tuple[str, ...]
    tokens: int
    prefix: int
    grid: tuple[int, int]


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
    varying token counts (class attention, CaiT's talking heads)."""
    from .gradcam import gradcam_layers

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
    tokens = layout.prefix + layout.grid[0] * layout.grid[1]
    odd = [(l.name, l.shape) for l in found if l.shape is None or tuple(l.shape[-2:]) != (tokens, tokens)]
    if odd:
        name, shape = odd[0]
        raise UnsupportedModelError(
            f"model {net.name!r}: attention {name!r} has shape {shape}, not ({tokens} x {tokens}) "
            f"over all {tokens} tokens as every block's self-attention must be to be followed (class "
            "attention 1 x T and talking-heads attention are not); use gradcam or rise.")
    return Attention(tuple(l.output for l in found), tokens, layout.prefix, tuple(layout.grid))
