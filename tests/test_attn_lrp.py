"""AttnLRP against independent truth: lxt's own rules (its ``lxt.efficient`` functions) applied to the timm
model each file was exported from; the conservation of relevance (input, biases and softmax losses add
up to the logit); and tiny graphs whose relevance is computed by hand, message by message, with each
rule's formula (never with gradients)."""
import functools
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from scipy.special import erf

import explainer
from explainer.errors import UnsupportedModelError
from explainer.methods import _lrp
from explainer.methods.attn_lrp import raw
from explainer.runtime.torch_engine import convert_graph, torch_engine

import exports

LABELS = [285, 281]


# lxt on the timm model ------------------------------------------------------------------------------
def _lxt():
    """lxt's ``rules`` and ``patches`` modules. lxt 2.1's ``lxt/efficient/__init__.py`` imports its
    patched copies of Hugging Face models, written for transformers 4 (they fail on 5.x), so the
    package is registered without running it and the two modules are imported from it as they are."""
    if "lxt.efficient" not in sys.modules:
        package = types.ModuleType("lxt.efficient")
        package.__path__ = [str(Path(importlib.util.find_spec("lxt").origin).parent / "efficient")]
        sys.modules["lxt.efficient"] = package
    from lxt.efficient import patches, rules

    return rules, patches


@functools.cache
def _lxt_model(family):
    """The timm model with lxt's AttnLRP patches, per instance (nothing global changes): every
    LayerNorm's forward is lxt's ``layer_norm_forward`` (std detached), every GELU lxt's
    ``non_linear_forward`` (identity rule), and attention runs through lxt's ``wrap_attention_forward``
    (the uniform rule: gradients at queries and keys divided by 4, at values by 2; softmax's own
    gradient), as lxt patches the attention functions of the transformers models it supports."""
    _, patches = _lxt()
    model = exports.build(family)
    attention = patches.wrap_attention_forward(lambda module, q, k, v: F.scaled_dot_product_attention(q, k, v))

    def attention_forward(self, x, attn_mask=None, is_causal=False):  # timm's Attention.forward, ViT's path
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = attention(self, self.q_norm(q), self.k_norm(k), v)
        return self.proj(self.norm(x.transpose(1, 2).reshape(b, n, -1)))

    return lxt_patched(model, {"Attention": attention_forward})


def lxt_patched(model, attention_forwards: dict):
    """``model`` with lxt's patches, per instance: the forwards given for attention modules (by class
    name), lxt's ``layer_norm_forward`` on every LayerNorm and ``non_linear_forward`` on every GELU."""
    _, patches = _lxt()
    for m in model.modules():
        if type(m).__name__ in attention_forwards:
            m.forward = types.MethodType(attention_forwards[type(m).__name__], m)
        elif isinstance(m, torch.nn.LayerNorm):
            m.forward = types.MethodType(patches.layer_norm_forward, m)
        elif isinstance(m, torch.nn.GELU):
            m.original_forward = m.forward
            m.forward = types.MethodType(patches.non_linear_forward, m)
    return model


def _lxt_relevance(family, pixels, label):
    """lxt's usage: input x gradient at the model's input (the normalised image), summed over channels."""
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None] / 255.0
    x = (x - torch.tensor(exports.MEAN).view(1, 3, 1, 1)) / torch.tensor(exports.STD).view(1, 3, 1, 1)
    x.requires_grad_(True)
    out = _lxt_model(family)(x)
    grad, = torch.autograd.grad(out[0, label], x)
    return (x * grad)[0].sum(0).detach().numpy().astype(np.float64), float(out[0, label].detach())


@functools.cache
def _net(family, exporter, variant="plain"):
    return explainer.load(exports.export(family, exporter, variant))


@pytest.fixture(scope="module", autouse=True)
def _free_models():
    """The models and lxt's copies are shared by this file's tests, then let go."""
    yield
    _net.cache_clear()
    _lxt_model.cache_clear()


@pytest.mark.parametrize("family,exporter,variant", [
    ("vit_tiny", "legacy", "plain"), ("vit_tiny", "dynamo", "plain"), ("vit_tiny", "legacy-old", "plain"),
    ("deit_tiny_distilled", "legacy", "plain"), ("deit_tiny_distilled", "dynamo", "plain"),
    ("vit_tiny", "legacy", "production")])
def test_attn_lrp_equals_lxt_on_the_timm_model(family, exporter, variant, chelsea):
    """Legacy writes GELU as x * 0.5 * (1 + Erf(x / sqrt 2)) (the identity rule, not the product rule,
    must apply); dynamo as Gelu; legacy-old also writes layer norms out (ReduceMean/Sub/Pow/Sqrt/Div);
    "production" takes NHWC uint8 pixels and normalises them in the graph (the relevance is read where
    that normalisation ends, so the map is the one of the same network normalising outside). All
    equal lxt's relevance (allclose), so correlation 1 at pixels and at patches."""
    from explainer.methods._common import resize_map

    net = _net(family, exporter, variant)
    pixels = net.fit_pixels(chelsea.astype(np.float32))
    engine = torch_engine(net)
    x = engine.pixel_model.model_input(engine.tensor(pixels).permute(2, 0, 1)[None])
    grid, scores = raw(engine, x, LABELS)
    grid = grid.sum(3 if engine.pixel_model.nhwc else 1).numpy().astype(np.float64)
    for k, label in enumerate(LABELS):
        ref, logit = _lxt_relevance(family, pixels, label)
        assert float(scores[k]) == pytest.approx(logit, rel=1e-4)
        np.testing.assert_allclose(grid[k], ref, rtol=1e-3, atol=2e-5 * np.abs(ref).max())
        assert np.corrcoef(grid[k].ravel(), ref.ravel())[0, 1] >= 0.9999
        patches = [g.reshape(14, 16, 14, 16).sum((1, 3)).ravel() for g in (grid[k], ref)]
        assert np.corrcoef(*patches)[0, 1] >= 0.9999
    if exporter == "legacy" and variant == "plain":  # the public map: the graph-size relevance resized
        ours = explainer.attn_lrp(net, chelsea, LABELS)
        assert ours.shape == (2, *chelsea.shape[:2]) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, resize_map(grid.astype(np.float32), chelsea.shape[:2]), rtol=1e-4,
                                   atol=1e-5 * np.abs(grid).max())
        assert not np.allclose(ours[0], ours[1])


@pytest.mark.parametrize("family,exporter,variant", [
    ("vit_tiny", "legacy", "plain"), ("vit_tiny", "dynamo", "plain"), ("deit_tiny_distilled", "legacy", "plain"),
    ("deit_tiny_distilled", "dynamo", "plain"), ("vit_tiny", "legacy", "production")])
def test_relevance_adds_up_to_the_logit(family, exporter, variant, chelsea):
    """The input's relevance is the logit less what the constants added on the way absorb (biases,
    class and distillation tokens, positional embeddings, layer norms' shifts) and what the softmax
    rule leaves out; the three add up to the logit within 1e-4. The input's share alone is far from it
    (on these seeded models when this was written: 29 % and 48 % of the logits of classes 285 and 281
    for vit_tiny, 20 % and 91 % for DeiT)."""
    net = _net(family, exporter, variant)
    engine = torch_engine(net)
    x = engine.pixel_model.model_input(engine.tensor(net.fit_pixels(chelsea.astype(np.float32))).permute(2, 0, 1)[None])
    index = engine.pixel_model.logits_index

    def score(label):
        return lambda out: (out[index] if isinstance(out, (tuple, list)) else out).reshape(1, -1)[0, label]

    for label in LABELS:
        book = _lrp.relevance(engine.graph_module, _lrp.engine_plan(engine), x, score(label), account=True)
        total = float(book["input"].sum()) + book["biases"] + book["softmax"]
        assert total == pytest.approx(book["score"], rel=1e-4, abs=1e-4)


def test_attn_lrp_refuses_a_cnn(chelsea):
    net = explainer.load(exports.export("resnet18", "dynamo"))
    with pytest.raises(UnsupportedModelError, match="no attention"):
        explainer.attn_lrp(net, chelsea, 0)


# hand-computed cases: one rule at a time ------------------------------------------------------------
def _module(nodes, constants, shape, opset=17):
    """(converted module, rule plan) of a graph from input "x" to output "y"."""
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in constants.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    module, ctx = convert_graph(model, "x", list(shape))
    return module, _lrp.plan(module, {ctx.renamed["nodes"][n.name]: n.op_type for n in model.graph.node})


def _relevance(module, rules, x):
    out = _lrp.relevance(module, rules, torch.tensor(x, dtype=torch.float32), lambda y: y.sum(), account=True)
    return out["input"].numpy().astype(np.float64), out


def _node(op, inputs, output, **attrs):
    return helper.make_node(op, inputs, [output], name=output, **attrs)


def _epsilon(x, w, r_out, z):
    """LRP-0 (the epsilon rule, ε = 0) through z = x @ w: R_x[t, c] = Σ_d x[t, c] w[c, d] R[t, d] / z[t, d]."""
    return np.einsum("tc,cd,td->tc", x, w, r_out / z)


RNG = np.random.default_rng(7)


def test_attention_rules_by_hand():
    """One head: q, k, v = x Wq, x Wk, x Wv; A = softmax(q k^T); y = Σ (A v) ⊙ w. Relevance message by
    message: the epsilon rule then the uniform rule at both products (AttnLRP Prop. 3.3), the softmax
    rule R_s = s (R_A - A Σ R_A) (Prop. 3.1), the epsilon rule on the projections."""
    x = RNG.standard_normal((1, 4, 3))
    wq, wk, wv, w = (RNG.standard_normal((3, 3)) for _ in range(4))
    nodes = [_node("MatMul", ["x", "Wq"], "q"), _node("MatMul", ["x", "Wk"], "k"), _node("MatMul", ["x", "Wv"], "v"),
             _node("Transpose", ["k"], "kt", perm=[0, 2, 1]), _node("MatMul", ["q", "kt"], "s"),
             _node("Softmax", ["s"], "a", axis=-1), _node("MatMul", ["a", "v"], "o"), _node("Mul", ["o", "w"], "ow"),
             _node("ReduceSum", ["ow"], "y", keepdims=0)]
    module, rules = _module(nodes, {"Wq": wq, "Wk": wk, "Wv": wv, "w": w[0]}, x.shape)
    assert rules.counts()["uniform"] == 2 and rules.counts()["softmax"] == 1
    ours, book = _relevance(module, rules, x)

    x0 = x[0]
    q, k, v = x0 @ wq, x0 @ wk, x0 @ wv
    s = q @ k.T
    a = np.exp(s - s.max(1, keepdims=True))
    a /= a.sum(1, keepdims=True)
    o = a @ v
    r_o = o * w[0]
    terms = np.einsum("ij,jc->ijc", a, v) * (r_o / o)[:, None, :] / 2  # epsilon, then half to each factor
    r_a, r_v = terms.sum(2), terms.sum(0)
    r_s = s * (r_a - a * r_a.sum(1, keepdims=True))
    terms = np.einsum("id,jd->ijd", q, k) * (r_s / s)[:, :, None] / 2
    r_q, r_k = terms.sum(1), terms.sum(0)
    expected = _epsilon(x0, wq, r_q, q) + _epsilon(x0, wk, r_k, k) + _epsilon(x0, wv, r_v, v)
    np.testing.assert_allclose(ours[0], expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    # everything the softmax rule does not pass on is its loss; nothing else is lost (no biases)
    assert ours.sum() + book["softmax"] == pytest.approx(float((o * w[0]).sum()), rel=1e-4)
    assert book["softmax"] == pytest.approx(float(r_a.sum() - r_s.sum()), rel=1e-4, abs=1e-6)


def test_uniform_rule_on_an_elementwise_product_by_hand():
    """y = Σ (x Wa) ⊙ (x Wb): each factor gets half of each product's relevance (the plain gradient
    would give each all of it, twice the score in all)."""
    x = RNG.standard_normal((1, 2, 3))
    wa, wb = RNG.standard_normal((3, 3)), RNG.standard_normal((3, 3))
    nodes = [_node("MatMul", ["x", "Wa"], "a"), _node("MatMul", ["x", "Wb"], "b"), _node("Mul", ["a", "b"], "ab"),
             _node("ReduceSum", ["ab"], "y", keepdims=0)]
    module, rules = _module(nodes, {"Wa": wa, "Wb": wb}, x.shape)
    assert rules.counts()["uniform"] == 1 and rules.counts()["gated"] == 0
    ours, _ = _relevance(module, rules, x)
    a, b = x[0] @ wa, x[0] @ wb
    expected = _epsilon(x[0], wa, a * b / 2, a) + _epsilon(x[0], wb, a * b / 2, b)
    np.testing.assert_allclose(ours[0], expected, rtol=1e-4, atol=1e-6)
    assert ours.sum() == pytest.approx(float((a * b).sum()), rel=1e-4)


def _gelu(h):
    return h * 0.5 * (1 + erf(h / np.sqrt(2)))


@pytest.mark.parametrize("form", ["Gelu", "erf-legacy", "erf-dynamo", "silu", "Tanh"])
def test_identity_rule_on_activations_by_hand(form):
    """h = x W1; y = Σ f(h) ⊙ w: the activation passes relevance unchanged (R_h = f(h) w), written as one
    op or as the exporters write GELU out, x * (1 + Erf(x / sqrt 2)) * 0.5 (legacy) or
    (x * 0.5) * (1 + Erf(x * 0.7071)) (where both factors depend on x: one activation, not a product of
    two), and SiLU x * Sigmoid(x)."""
    x = RNG.standard_normal((1, 3, 4))
    w1, w = RNG.standard_normal((4, 5)), RNG.standard_normal(5)
    constants = {"W1": w1, "w": w, "half": 0.5, "one": 1.0, "root2": np.sqrt(2), "inv_root2": 1 / np.sqrt(2)}
    head = [_node("MatMul", ["x", "W1"], "h")]
    tail = [_node("Mul", ["f", "w"], "fw"), _node("ReduceSum", ["fw"], "y", keepdims=0)]
    body, f, opset = {
        "Gelu": ([_node("Gelu", ["h"], "f")], _gelu, 20),
        "erf-legacy": ([_node("Div", ["h", "root2"], "d"), _node("Erf", ["d"], "e"), _node("Add", ["e", "one"], "e1"),
                        _node("Mul", ["h", "e1"], "he"), _node("Mul", ["he", "half"], "f")], _gelu, 17),
        "erf-dynamo": ([_node("Mul", ["h", "half"], "hh"), _node("Mul", ["h", "inv_root2"], "d"),
                        _node("Erf", ["d"], "e"), _node("Add", ["e", "one"], "e1"), _node("Mul", ["hh", "e1"], "f")],
                       _gelu, 17),
        "silu": ([_node("Sigmoid", ["h"], "g"), _node("Mul", ["h", "g"], "f")], lambda h: h / (1 + np.exp(-h)), 17),
        "Tanh": ([_node("Tanh", ["h"], "f")], np.tanh, 17),
    }[form]
    module, rules = _module(head + body + tail, constants, x.shape, opset)
    assert rules.counts()["uniform"] == 0
    ours, book = _relevance(module, rules, x)
    h = x[0] @ w1
    expected = _epsilon(x[0], w1, f(h) * w, h)
    np.testing.assert_allclose(ours[0], expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    assert ours.sum() == pytest.approx(float((f(h) * w).sum()), rel=1e-4)


@pytest.mark.parametrize("form", ["LayerNormalization", "decomposed"])
def test_layer_norm_rule_by_hand(form):
    """n = (x - mean) / std * γ + β; y = Σ n W. The deviation is a constant (AttnLRP Prop. 3.4, lxt's
    layer_norm_forward): R through n's linear part, β absorbing its share, then the centring (a linear
    map) by the epsilon rule; as one node or written out as the legacy exporter before opset 17 does."""
    x = RNG.standard_normal((1, 3, 4)) + 0.5
    gamma, beta, w = RNG.standard_normal(4), RNG.standard_normal(4), RNG.standard_normal((4, 2))
    eps = 1e-5
    constants = {"gamma": gamma, "beta": beta, "W": w, "two": 2.0, "eps": eps}
    if form == "LayerNormalization":
        body = [_node("LayerNormalization", ["x", "gamma", "beta"], "n", axis=-1, epsilon=eps)]
    else:
        body = [_node("ReduceMean", ["x"], "m", axes=[-1]), _node("Sub", ["x", "m"], "c"),
                _node("Pow", ["c", "two"], "c2"), _node("ReduceMean", ["c2"], "var", axes=[-1]),
                _node("Add", ["var", "eps"], "ve"), _node("Sqrt", ["ve"], "sd"), _node("Div", ["c", "sd"], "u"),
                _node("Mul", ["u", "gamma"], "ug"), _node("Add", ["ug", "beta"], "n")]
    nodes = body + [_node("MatMul", ["n", "W"], "z"), _node("ReduceSum", ["z"], "y", keepdims=0)]
    module, rules = _module(nodes, constants, x.shape)
    assert rules.counts()["uniform"] == 0
    ours, book = _relevance(module, rules, x)
    x0 = x[0]
    c = x0 - x0.mean(1, keepdims=True)
    u = c / np.sqrt((c ** 2).mean(1, keepdims=True) + eps)
    n = u * gamma + beta
    r_n = n * w.sum(1)  # LRP-0 through the linear layer to the sum
    r_c = (u * gamma) / n * r_n  # β's share absorbed; identity through γ and 1 / std
    centring = np.eye(4) - 1 / 4
    expected = np.einsum("tj,ij,ti->tj", x0, centring, r_c / c)  # R_x[j] = Σ_i x_j (δ_ij - 1/N) R_c[i] / c[i]
    np.testing.assert_allclose(ours[0], expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    assert book["biases"] == pytest.approx(float((beta / n * r_n).sum()), rel=1e-4)
    assert ours.sum() + book["biases"] == pytest.approx(float((n @ w).sum()), rel=1e-4)
