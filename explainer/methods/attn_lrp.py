"""AttnLRP (Achtibat et al., "AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for
Transformers", ICML 2024): layer-wise relevance propagation through the converted module with
AttnLRP's rules, in the gradient x input form of its library lxt ("efficient": one forward and one
modified backward pass; ``explainer/methods/_lrp.py`` says where each rule goes and why).

The map is the relevance of the normalised image (as lxt takes its input embeddings): the graph's
input, or, for a graph that normalises its own pixels ((x - mean) / std written in the graph), the
tensor where that normalisation ends, carried back to the pixels unchanged (AttnLRP's identity rule
for elementwise functions of one value; the same map as the network normalising outside). Summed
over channels: signed, in units of the class score (the logit before any softmax), at the graph's
input size, resized to the image's. Its sum is the score less what the biases absorb (every
constant added on the way: linear and convolution biases, the class token and positional
embeddings, layer norms' shifts) and what the softmax rule leaves out (the part of its output's
relevance that its rule, R_in = x (R_out - s Σ R_out), does not pass to its input);
``_lrp.relevance(..., account=True)`` measures both, and the three add up to the score.

CaiT (Touvron et al., ICCV 2021) needs no rule of its own: its talking-heads self-attention mixes the
heads by constant (heads x heads) matrices before and after the Softmax, linear maps whose plain
gradient is the epsilon rule, between the two products of image-dependent tensors (queries times keys,
attention times values) that take the uniform rule as in any attention; its class attention is
attention with one query; its class token, a learned parameter concatenated to the patch tokens before
the class-attention blocks, is a constant added on the way, measured with the biases. So the input,
bias and softmax shares add up to the score there too (test: equal to lxt's rules written into timm's
CaiT module).

Models without attention are refused: there the rules reduce to gradient x input, which the
``gradient`` family of methods already covers.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import UnsupportedModelError
from ..runtime.torch_engine import torch_engine
from . import _lrp
from ._attention import attention_softmaxes
from ._common import MapMethod, class_scores
from .registry import GRADIENT, method

if TYPE_CHECKING:
    from ..runtime.classifier import Classifier


def has_attention(net: Classifier, where: str) -> None:
    """Raises ``UnsupportedModelError`` for a model with no attention (no Softmax over a product of two
    image-dependent tensors)."""
    if not attention_softmaxes(net):
        raise UnsupportedModelError(
            f"{where}: model {net.name!r} has no attention (no Softmax over a product of two image-dependent "
            "tensors): AttnLRP explains transformers, and without attention its rules are gradient x input; "
            "use gradient, integrated_gradients, gradcam or occlusion.")


def raw(engine, x, indices):
    """(K, C, H, W) relevance of the graph's input ``x`` (1, C, H, W in the graph's layout, a tensor on
    the engine's device) for each class index, and the (K,) scores."""
    import torch

    x = x.detach().repeat(len(indices), *[1] * (x.dim() - 1)).requires_grad_(True)
    entries = []
    with engine.exclusive(), torch.enable_grad():
        scores = _lrp.logits(engine, x, entries=entries)
        picked = class_scores(scores, indices, "attn_lrp")
        grad, = torch.autograd.grad(picked.sum(), x)
        relevance = _lrp.input_relevance(engine.graph_module, _lrp.engine_plan(engine), x, grad, entries)
    return relevance, picked.detach()


@method("attn_lrp", kind=GRADIENT, options={},
        answers="how much each pixel contributes to the class score, decomposed layer by layer with AttnLRP's "
                "rules for attention, softmax, layer norms and activations (Achtibat et al. 2024)",
        returns="maps at the image's size: relevance summed over channels, signed, in score units (their sum "
                "is the score less what biases and softmaxes absorb)",
        cost="1 forward and 1 modified backward pass per image (all labels in one batch)",
        reference="lxt's AttnLRP rules (lxt.efficient) on the timm model (test); input, bias and softmax "
                  "relevance add up to the logit (test)", order=130)
def attn_lrp(net: Classifier, image, label):
    """Relevance map(s): (H, W) for one label, (K, H, W) for several; transformers (any model whose
    graph has attention: ViT, DeiT and CaiT among them)."""
    return AttnLRP(net)(image, label)


class AttnLRP(MapMethod):
    where = "attn_lrp"

    def setup(self, pixels, indices):
        has_attention(self.net, self.where)
        self.engine = torch_engine(self.net)

    def explain(self, pixels, indices):
        engine = self.engine
        x = engine.pixel_model.model_input(engine.tensor(self.net.fit_pixels(pixels)).permute(2, 0, 1)[None])
        relevance, _ = raw(engine, x, indices)
        return relevance.sum(dim=3 if engine.pixel_model.nhwc else 1).cpu().numpy().astype(np.float32)
