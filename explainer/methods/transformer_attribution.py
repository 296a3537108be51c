"""Transformer attribution (Chefer, Gur & Wolf, "Generic Attention-model Explainability for Interpreting
Bi-Modal and Encoder-Decoder Transformers", ICCV 2021): attention weighted by the class score's gradient,
accumulated through the blocks. Runs on the converted module (gradients of the attention probabilities).

R starts as the identity (each token its own relevance); per block, in order, with A the attention
probabilities (heads, T, T) and G = d score / d A: Ā = mean over heads of max(G ⊙ A, 0), and R ← R + Ā R.
The class token's row of R over the patch tokens, laid out on the patch grid, is the map (in the units
of score x probability; class-specific).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..runtime.torch_engine import torch_engine
from ._attention import self_attention
from ._common import MapMethod, class_scores
from .registry import GRADIENT, method

if TYPE_CHECKING:
    from ..runtime.classifier import Classifier


def relevance(attentions, gradients):
    """(K, T, T) relevance from per-block attention probabilities and their gradients, each
    (K, heads, T, T) (torch tensors, one row per label)."""
    import torch

    tokens = attentions[0].shape[-1]
    r = torch.eye(tokens, dtype=torch.float64, device=attentions[0].device).repeat(len(attentions[0]), 1, 1)
    for a, g in zip(attentions, gradients):
        cam = (g.double() * a.double()).clamp(min=0).mean(dim=1)
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
    """Relevance map(s): (H, W) for one label, (K, H, W) for several; ViT and DeiT-style models (a class
    token, self-attention over all tokens)."""
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
        shape = (len(indices), -1, found.tokens, found.tokens)
        attentions, gradients, at = [], [], 0
        for ts in parts:  # a graph that runs image by image records one part per run
            attentions.append(torch.cat([t.detach() for t in ts]).reshape(shape))
            gradients.append(torch.cat(flat[at:at + len(ts)]).reshape(shape))
            at += len(ts)
        r = relevance(attentions, gradients)
        return r[:, 0, found.prefix:].reshape(len(indices), *found.grid).cpu().numpy().astype(np.float32)
