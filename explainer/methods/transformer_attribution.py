"""Transformer attribution (Chefer, Gur & Wolf, "Generic Attention-model Explainability for Interpreting
Bi-Modal and Encoder-Decoder Transformers", ICCV 2021): attention weighted by the class score's gradient,
accumulated through the blocks. Runs on the converted module (gradients of the attention probabilities).

R starts as the identity (each token its own relevance); per block, in order, with A the attention
probabilities (heads, T, T) and G = d score / d A: Ā = mean over heads of max(G ⊙ A, 0), and R ← R + Ā R.
The class token's row of R over the patch tokens, laid out on the patch grid, is the map (in the units
of score x probability; class-specific).

CaiT (Touvron et al., ICCV 2021; ``explainer/methods/_attention.py``): the same update per block, with
Ā written over all T tokens and zero in the rows of the tokens the block leaves unchanged. Its
self-attention blocks attend over the patches only (A the talking-heads Softmax's probabilities, G
their gradient, which carries the mixing of heads after the Softmax), so R's patch-to-patch part
grows as ViT's R does while the class token's row stays e_class (the class token, a learned
parameter, is not in those blocks and no image reaches it); each class-attention block (only the class
token attends, over [class, patches]: Ā one row) adds Ā_class · R to the class token's row: its own
previous row and the patches' rows, weighted by its gradient-weighted attention. The map is the class
row over the patches.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..runtime.torch_engine import torch_engine
from ._attention import SELF, embed, self_attention
from ._common import MapMethod, class_scores
from .registry import GRADIENT, method

if TYPE_CHECKING:
    from ..runtime.classifier import Classifier


def relevance(attentions, gradients, kinds=None, prefix: int = 1, tokens: int | None = None):
    """(K, T, T) relevance from per-block attention probabilities and their gradients, each
    (K, heads, queries, keys) (torch tensors, one row per label) of its kind in ``kinds``
    (``_attention``'s "self", "patches" or "class"; all "self" by default: (K, heads, T, T))."""
    import torch

    kinds = kinds or (SELF,) * len(attentions)
    tokens = tokens or attentions[0].shape[-1]
    r = torch.eye(tokens, dtype=torch.float64, device=attentions[0].device).repeat(len(attentions[0]), 1, 1)
    for a, g, kind in zip(attentions, gradients, kinds):
        cam = embed((g.double() * a.double()).clamp(min=0).mean(dim=1), kind, prefix, tokens, diagonal=0.0)
        r = r + cam @ r
    return r


@method("transformer_attribution", kind=GRADIENT, options={},
        answers="which patches the class score depends on through the attention of every block: attention "
                "weighted by its gradient, propagated with the residual connections (Chefer et al. 2021)",
        returns="maps at the image's size: the class token's relevance to each patch (score x probability "
                "units)",
        cost="1 forward and 1 backward pass per image (all labels in one batch)",
        reference="hila-chefer/Transformer-MM-Explainability's ViT relevance on the timm model (test)", order=140)
def transformer_attribution(net: Classifier, image, label):
    """Relevance map(s): (H, W) for one label, (K, H, W) for several; ViT, DeiT and CaiT-style models (a
    class token; self-attention over all tokens or over the patches, class attention)."""
    return TransformerAttribution(net)(image, label)


class TransformerAttribution(MapMethod):
    where = "transformer_attribution"

    def setup(self, pixels, indices):
        self.found = self_attention(self.net, self.where)
        self.engine = torch_engine(self.net)
        self.names = [self.net.layer(t).name for t in self.found.softmaxes]

    def explain(self, pixels, indices):
        import torch

        engine, found, names = self.engine, self.found, self.names
        x = engine.tensor(self.net.fit_pixels(pixels)).permute(2, 0, 1)[None].repeat(len(indices), 1, 1, 1)
        with torch.enable_grad(), engine.capture(names) as captured:
            scores = engine.pixel_model(x.requires_grad_(True)).reshape(len(indices), -1)
            target = class_scores(scores, indices, self.where).sum()
            parts = [captured.parts[n] for n in names]
            flat = torch.autograd.grad(target, [t for ts in parts for t in ts])
        attentions, gradients, at = [], [], 0
        for ts, kind in zip(parts, found.kinds):  # a graph that runs image by image records one part per run
            shape = (len(indices), -1, *found.shape(kind))
            attentions.append(torch.cat([t.detach() for t in ts]).reshape(shape))
            gradients.append(torch.cat(flat[at:at + len(ts)]).reshape(shape))
            at += len(ts)
        r = relevance(attentions, gradients, found.kinds, found.prefix, found.tokens)
        return r[:, 0, found.prefix:].reshape(len(indices), *found.grid).cpu().numpy().astype(np.float32)
