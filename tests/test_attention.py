"""Attention methods on ONNX vision transformers, against reference implementations on the timm model the
file was exported from (its attention read by forward hooks, as the references do)."""
import numpy as np
import pytest
import torch

import explainer
from explainer.errors import UnsupportedModelError

import exports


def _timm_attentions(family, pixels):
    """jacobgil/vit-explain's way: hooks on every block's attn_drop (timm's fused attention off, so
    that the probabilities exist as a tensor), one forward pass of the source model."""
    model = exports.build(family)
    found = []
    for block in model.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(lambda m, i, o: found.append(o.detach()))
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None] / 255.0
    x = (x - torch.tensor(exports.MEAN).view(1, 3, 1, 1)) / torch.tensor(exports.STD).view(1, 3, 1, 1)
    with torch.no_grad():
        model(x)
    return found


def _vit_explain_rollout(attentions, discard_ratio, head_fusion, rows_keepdim):
    """vit-explain's ``rollout`` (read, written again here): heads fused, the lowest entries dropped
    except the class token's to itself, (A + I) / 2 normalised, multiplied up; ``rows_keepdim=False``
    divides as its ``a / a.sum(dim=-1)`` broadcasts (column j by row j's sum), True by each row's sum."""
    result = torch.eye(attentions[0].size(-1))
    for attention in attentions:
        fused = getattr(attention, head_fusion)(dim=1)
        fused = (fused[0] if isinstance(fused, tuple) else fused).clone()
        flat = fused.view(fused.size(0), -1)
        _, indices = flat.topk(int(flat.size(-1) * discard_ratio), -1, False)
        flat[0, indices[indices != 0]] = 0
        a = (fused + torch.eye(fused.size(-1))) / 2
        a = a / (a.sum(dim=-1, keepdim=True) if rows_keepdim else a.sum(dim=-1))
        result = torch.matmul(a, result)
    return result[0]


def _rollout_grid(net, image, head_fusion, discard, normalisation="rows"):
    """The library's rollout at the patch grid (what the public map is resized from)."""
    from explainer.methods._attention import self_attention
    from explainer.methods.attention_rollout import rollout

    found = self_attention(net, "test")
    probs = net.ort.run(net.to_model_input(net.fit_pixels(image.astype(np.float32))[None]), list(found.softmaxes))
    result = rollout([np.asarray(p).reshape(-1, *found.shape(k)) for p, k in zip(probs, found.kinds)], head_fusion,
                     discard, normalisation, found.kinds, found.prefix)
    return result[0, found.prefix:].reshape(found.grid)


@pytest.mark.parametrize("family,exporter,prefix", [("vit_tiny", "legacy", 1), ("deit_tiny_distilled", "dynamo", 2),
                                                    ("vit_tiny", "legacy-old", 1)])
@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
def test_rollout_equals_vit_explain_on_the_timm_model(family, exporter, prefix, head_fusion, chelsea):
    """Equal (allclose) to vit-explain's rollout with each row renormalised (the default), and with
    normalisation="vit-explain" to its literal division (column j by row j's sum), which differs where
    rows of (A + I) / 2 do not sum to 1 (max or min over heads, entries discarded)."""
    from explainer.methods._common import resize_map

    net = explainer.load(exports.export(family, exporter))
    attentions = _timm_attentions(family, net.fit_pixels(chelsea.astype(np.float32)))
    for discard in (0.0, 0.9):
        ours = explainer.attention_rollout(net, chelsea, 285, head_fusion=head_fusion, discard_ratio=discard)
        assert ours.shape == chelsea.shape[:2] and ours.dtype == np.float32
        grid = _rollout_grid(net, chelsea, head_fusion, discard)
        np.testing.assert_allclose(ours, resize_map(grid[None].astype(np.float32), chelsea.shape[:2])[0],
                                   rtol=1e-5, atol=1e-7)
        exact = _vit_explain_rollout(attentions, discard, head_fusion, rows_keepdim=True)[0, prefix:]
        np.testing.assert_allclose(grid.ravel(), exact.numpy(), rtol=1e-3, atol=1e-4 * float(exact.max()))
        literal = _vit_explain_rollout(attentions, discard, head_fusion, rows_keepdim=False)[0, prefix:]
        theirs = _rollout_grid(net, chelsea, head_fusion, discard, normalisation="vit-explain")
        np.testing.assert_allclose(theirs.ravel(), literal.numpy(), rtol=1e-3, atol=1e-4 * float(literal.max()))
        assert np.corrcoef(theirs.ravel(), literal.numpy().ravel())[0, 1] >= 0.999
        public = explainer.attention_rollout(net, chelsea, 285, head_fusion=head_fusion, discard_ratio=discard,
                                             normalisation="vit-explain")
        np.testing.assert_allclose(public, resize_map(theirs[None].astype(np.float32), chelsea.shape[:2])[0],
                                   rtol=1e-5, atol=1e-7)


def test_rollout_of_a_hand_computed_case():
    """Two blocks, one head, three tokens: the product of the row-normalised (A + I) / 2 by hand."""
    from explainer.methods.attention_rollout import rollout

    a1 = np.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]])
    a2 = np.array([[[0.2, 0.3, 0.5], [1 / 3, 1 / 3, 1 / 3], [0.0, 0.5, 0.5]]])
    eye = np.eye(3)
    expected = ((a2[0] + eye) / 2) @ ((a1[0] + eye) / 2)
    np.testing.assert_allclose(rollout([a1, a2]), expected, rtol=1e-12)
    # discarding the lowest 3 of 9 entries, never the class token's to itself: in a1 the 0.1 at [1, 0]
    # and [1, 2] and the first 0.2 at [2, 0]; in a2 the 0 at [2, 0] and the 0.3 at [0, 1] (its 0.2 at
    # [0, 0] stays); then each row renormalised
    d1, d2 = a1[0].copy(), a2[0].copy()
    d1[1, 0] = d1[1, 2] = d1[2, 0] = 0
    d2[2, 0] = d2[0, 1] = 0
    step = [(d + eye) / 2 for d in (d1, d2)]
    step = [s / s.sum(1, keepdims=True) for s in step]
    np.testing.assert_allclose(rollout([a1, a2], discard_ratio=1 / 3 + 1e-9), step[1] @ step[0], rtol=1e-12)


@pytest.mark.parametrize("family,exporter,why", [("resnet18", "dynamo", "no attention"),
                                                 ("swin_timm", "dynamo", "reads no class token")])
def test_rollout_refuses_models_it_cannot_follow(family, exporter, why, chelsea):
    net = explainer.load(exports.export(family, exporter))
    for method in (explainer.attention_rollout, explainer.transformer_attribution):
        with pytest.raises(UnsupportedModelError, match=why):
            method(net, chelsea, 0)


def test_cait_is_followed_now(chelsea):
    """CaiT (talking-heads self-attention over the patches only, then class attention: 1 x T) was
    refused; its blocks are now followed by kind (tests/test_attention_cait.py checks the maps against
    a reference on the timm model)."""
    from explainer.methods._attention import self_attention

    net = explainer.load(exports.export("cait_xxs24", "legacy"))
    assert self_attention(net, "test").kinds == ("patches",) * 4 + ("class",) * 2
    for method in (explainer.attention_rollout, explainer.transformer_attribution):
        out = method(net, chelsea, [285, 281])
        assert out.shape == (2, *chelsea.shape[:2]) and out.dtype == np.float32 and np.all(np.isfinite(out))
        assert np.ptp(out[0]) > 0


def _chefer_reference(family, pixels, label):
    """hila-chefer/Transformer-MM-Explainability's ViT relevance (read, written again here) on the timm
    model: attention probabilities and their gradients by hooks (timm's fused attention off), the score
    the logit of ``label``; R = I, per block R += mean_heads(clamp(grad * attn, min=0)) @ R."""
    model = exports.build(family)
    attentions, grads = [], []

    def keep(module, args, out):
        attentions.append(out)
        out.register_hook(lambda g: grads.append(g))

    for block in model.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(keep)
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None] / 255.0
    x = (x - torch.tensor(exports.MEAN).view(1, 3, 1, 1)) / torch.tensor(exports.STD).view(1, 3, 1, 1)
    output = model(x.requires_grad_(True))
    output[0, label].backward()
    grads = grads[::-1]  # hooks fire in backward order
    r = torch.eye(attentions[0].shape[-1], dtype=torch.float64)
    for a, g in zip(attentions, grads):
        cam = (g[0].double() * a[0].detach().double()).clamp(min=0).mean(dim=0)
        r = r + cam @ r
    return r[0]


@pytest.mark.parametrize("family,exporter,prefix", [("vit_tiny", "legacy", 1), ("deit_tiny_distilled", "dynamo", 2),
                                                    ("vit_tiny", "legacy-old", 1)])
def test_transformer_attribution_equals_chefer_on_the_timm_model(family, exporter, prefix, chelsea):
    from explainer.methods._common import resize_map

    net = explainer.load(exports.export(family, exporter))
    pixels = net.fit_pixels(chelsea.astype(np.float32))
    labels = [285, 281]
    ours = explainer.transformer_attribution(net, chelsea, labels)
    assert ours.shape == (2, *chelsea.shape[:2]) and ours.dtype == np.float32
    for k, label in enumerate(labels):
        ref = _chefer_reference(family, pixels, label)[prefix:].reshape(1, 14, 14).numpy().astype(np.float32)
        # unnormalised, in their units: the public map is the reference's grid resized as every map is
        np.testing.assert_allclose(ours[k], resize_map(ref, chelsea.shape[:2])[0], rtol=1e-4,
                                   atol=1e-5 * float(np.abs(ref).max()))
    assert not np.allclose(ours[0], ours[1])  # class-specific, unlike rollout


def test_transformer_attribution_of_a_hand_computed_case():
    from explainer.methods.transformer_attribution import relevance

    rng = np.random.default_rng(0)
    a = [torch.from_numpy(rng.random((1, 2, 3, 3))) for _ in range(2)]
    g = [torch.from_numpy(rng.standard_normal((1, 2, 3, 3))) for _ in range(2)]
    r = np.eye(3)
    for ab, gb in zip(a, g):
        cam = np.maximum(gb[0].numpy() * ab[0].numpy(), 0).mean(axis=0)
        r = r + cam @ r
    np.testing.assert_allclose(relevance(a, g)[0].numpy(), r, rtol=1e-12)


def test_transformer_attribution_refuses_a_cnn(chelsea):
    net = explainer.load(exports.export("resnet18", "dynamo"))
    with pytest.raises(UnsupportedModelError, match="no attention"):
        explainer.transformer_attribution(net, chelsea, 0)


@pytest.mark.parametrize("normalisation", ["rows", "vit-explain"])
def test_rollout_of_a_batch_equals_each_image_alone(normalisation, chelsea, coffee):
    """The batched rollout (every image's blocks at once) equals the rollout of each image alone."""
    net = explainer.load(exports.export("vit_tiny"))
    images = [chelsea[:300, :400], coffee[:300, :400]]
    batch = explainer.attention_rollout(net, images, 285, discard_ratio=0.9, head_fusion="max",
                                        normalisation=normalisation)
    for image, got in zip(images, batch):
        alone = explainer.attention_rollout(net, image, 285, discard_ratio=0.9, head_fusion="max",
                                            normalisation=normalisation)
        np.testing.assert_allclose(got, alone, rtol=1e-5, atol=1e-7 * float(np.abs(alone).max()))
