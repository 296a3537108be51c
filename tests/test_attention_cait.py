"""The attention methods on CaiT (timm's ``cait_xxs24_224``: talking-heads self-attention over the patches
only, then class attention, where only the class token attends, over [class, patches]) against an
independent reference on the timm module each file was exported from: its attention probabilities
and their gradients read by hooks on timm's own modules, rollout and Chefer's relevance computed by the
derivation below with plain numpy, AttnLRP by lxt's own rule functions patched into the timm module.

The derivation (as the methods' docstrings state it): the self-attention blocks roll out to a (P x P)
patch-to-patch matrix R (ViT's step per block: heads fused, lowest entries discarded, (A + I) / 2, rows
renormalised); the class token starts as a learned parameter (no image in it: its relevance over
[class parameter, patches] is e_0); each class-attention block with the class token's fused attention
row a over [class, patches] sets c <- (a + e_0) / 2 (renormalised) times [c; patch rows], a patch's
row being its self-attention rollout row (the patches leave the self-attention stack so, and pass the
class-attention blocks unchanged). Chefer: R_sa <- R_sa + Ā R_sa per self-attention block, then
c <- c + ā [c; patch rows] per class-attention block, Ā = mean_heads(clamp(grad * A, min=0)).

Besides the exported model as it is (layer scales at CaiT's initial 1e-5: the image reaches the class
token only weakly), a copy with every layer scale set to 1 is exported here, so that every block's
attention matters to the class score."""
import functools
import shutil
import tempfile
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import explainer
from explainer.methods import _lrp
from explainer.methods._common import resize_map
from explainer.runtime.torch_engine import torch_engine

import exports

LABELS = [285, 281]
#: (exports family, the layer scale every block's gamma is set to or None: as built, the exporter)
SMALL = [("cait_xxs24", None, "legacy"), ("cait_xxs24", 1.0, "legacy"), ("cait_xxs24", None, "dynamo")]
PUBLISHED = [pytest.param("cait_xxs24_full", None, "legacy", marks=pytest.mark.published, id="cait_xxs24_full")]


# the models ---------------------------------------------------------------------------------------
def _build(family, layer_scale):
    model = exports.build(family)
    if layer_scale is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("gamma_1", "gamma_2")):
                    p.fill_(layer_scale)
    return model


def _path(family, layer_scale, exporter):
    if layer_scale is None:
        return exports.export(family, exporter)
    assert exporter == "legacy"
    path = exports.cache_root() / f"{family}-legacy-layerscale{layer_scale}" / "model.onnx"
    if not path.is_file():
        path.parent.parent.mkdir(parents=True, exist_ok=True)
        folder = tempfile.mkdtemp(dir=path.parent.parent, prefix=".partial-")
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(_build(family, layer_scale), (torch.randn(1, 3, 224, 224),), f"{folder}/model.onnx",
                              dynamo=False, opset_version=17, input_names=["input"], output_names=["scores"])
        shutil.rmtree(path.parent, ignore_errors=True)
        shutil.move(folder, path.parent)
    return path


@functools.cache
def _net(family, layer_scale, exporter="legacy"):
    return explainer.load(_path(family, layer_scale, exporter))


@functools.cache
def _model(family, layer_scale):
    return _build(family, layer_scale)


@pytest.fixture(scope="module", autouse=True)
def _free_models():
    yield
    _net.cache_clear()
    _model.cache_clear()
    _lxt_model.cache_clear()


def _normalised(pixels):
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None] / 255.0
    return (x - torch.tensor(exports.MEAN).view(1, 3, 1, 1)) / torch.tensor(exports.STD).view(1, 3, 1, 1)


# the reference ------------------------------------------------------------------------------------
def _timm_attention(model, pixels, label=None):
    """([(heads, P, P)], [(heads, 1, T)]) attention probabilities of the self- and class-attention
    blocks as timm computes them, float64 numpy, and with ``label`` their gradients of that logit (else
    None): the talking-heads Softmax's output read where ``proj_w`` takes it (a (B, P, P, heads) view),
    the class attention's where ``attn_drop`` takes it (timm's fused attention off)."""
    records = {"sa": [], "ca": []}

    def keep(into, heads_last):
        def hook(module, args):
            t = args[0]
            entry = {"a": t.detach(), "heads_last": heads_last}
            records[into].append(entry)
            if t.requires_grad:
                t.register_hook(lambda g: entry.__setitem__("g", g.detach()))
        return hook

    handles = [b.attn.proj_w.register_forward_pre_hook(keep("sa", True)) for b in model.blocks]
    for b in model.blocks_token_only:
        b.attn.fused_attn = False
        handles.append(b.attn.attn_drop.register_forward_pre_hook(keep("ca", False)))
    try:
        x = _normalised(pixels)
        if label is None:
            with torch.no_grad():
                model(x)
        else:
            model(x.requires_grad_(True))[0, label].backward()
    finally:
        for h in handles:
            h.remove()

    def array(entry, key):
        if key not in entry:
            return None
        t = entry[key][0].double()
        return (t.permute(2, 0, 1) if entry["heads_last"] else t).numpy()

    out = []
    for into in ("sa", "ca"):
        a = [array(e, "a") for e in records[into]]
        g = [array(e, "g") for e in records[into]] if label is not None else None
        out.append((a, g))
    (sa, sa_g), (ca, ca_g) = out
    for block in sa + ca:  # probabilities: each row over the keys sums to 1
        np.testing.assert_allclose(block.sum(-1), 1.0, rtol=1e-5)
    return sa, ca, sa_g, ca_g


def _fuse_and_discard(a, head_fusion, discard_ratio, keep_first):
    fused = getattr(a, head_fusion)(axis=0).copy()
    flat = fused.reshape(-1)
    n = int(flat.size * discard_ratio)
    if n:  # the n lowest; equal values (frequent among float32 minima over heads): the first ones
        lowest = np.argsort(flat, kind="stable")[:n]
        if keep_first:
            lowest = lowest[lowest != 0]
        flat[lowest] = 0.0
    return fused


def _reference_rollout(sa, ca, head_fusion="mean", discard_ratio=0.0, normalisation="rows"):
    """The class token's rolled-out attention over the P patches, by the derivation."""
    patches = sa[0].shape[-1]
    r = np.eye(patches)
    for a in sa:
        f = _fuse_and_discard(a, head_fusion, discard_ratio, keep_first=False)  # no class token here
        step = (f + np.eye(patches)) / 2
        sums = step.sum(1)
        step = step / (sums[:, None] if normalisation == "rows" else sums[None, :])
        r = step @ r
    rows = np.hstack([np.zeros((patches, 1)), r])  # each patch's row over [class parameter, patches]
    c = np.eye(1 + patches)[0]  # the class token: the learned parameter alone
    for a in ca:
        row = _fuse_and_discard(a, head_fusion, discard_ratio, keep_first=True)[0]
        row[0] += 1.0
        row /= 2.0
        # rows: to sum 1; vit-explain: column j by row j's sum (the class row's for j = 0, 1 for the
        # patches, whose rows in this block are their own unchanged values)
        row = row / row.sum() if normalisation == "rows" else np.concatenate([[row[0] / row.sum()], row[1:]])
        c = row[0] * c + row[1:] @ rows
    return c[1:]


def _reference_chefer(sa, ca, sa_g, ca_g):
    patches = sa[0].shape[-1]
    r = np.eye(patches)
    for a, g in zip(sa, sa_g):
        r = r + np.maximum(g * a, 0).mean(0) @ r
    rows = np.hstack([np.zeros((patches, 1)), r])
    c = np.eye(1 + patches)[0]
    for a, g in zip(ca, ca_g):
        cam = np.maximum(g * a, 0).mean(0)[0]
        c = c + cam[0] * c + cam[1:] @ rows
    return c[1:]


def _corr(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


# what the library finds ---------------------------------------------------------------------------
def test_cait_blocks_are_found_with_their_kinds():
    from explainer.methods._attention import self_attention

    net = _net("cait_xxs24", None, "legacy")
    found = self_attention(net, "test")
    assert found.kinds == ("patches",) * 4 + ("class",) * 2
    assert (found.tokens, found.prefix, found.grid) == (197, 1, (14, 14))
    assert [found.shape(k) for k in ("patches", "class")] == [(196, 196), (1, 197)]
    # the talking-heads mixings (constant heads x heads) are on the attention's path, before and after
    attention = net.structure.attention
    assert {"/blocks/blocks.0/attn/proj_l/MatMul_output_0", "/blocks/blocks.0/attn/MatMul_output_0",
            "/blocks/blocks.0/attn/proj_w/Add_output_0"} <= attention
    assert "/blocks/blocks.0/attn/MatMul_1_output_0" not in attention  # the product with the values


def test_rollout_of_a_hand_computed_cait_case():
    """One class token, two patches: a self-attention block over the patches (one head), then a class
    attention row over [class, p1, p2]; by hand: the patches' (A + I) / 2, then the class row
    ((a + e_0) / 2) times [e_0; patch rows]."""
    from explainer.methods.attention_rollout import class_rows, rollout

    sa = np.array([[[0.7, 0.3], [0.4, 0.6]]])
    ca = np.array([[[0.2, 0.5, 0.3]]])
    patch_step = (sa[0] + np.eye(2)) / 2  # rows sum to 1 already
    class_row = np.array([0.6, 0.25, 0.15])
    expected = class_row[0] * np.array([1.0, 0, 0]) + class_row[1:] @ np.hstack([np.zeros((2, 1)), patch_step])
    got = rollout([sa, ca], kinds=("patches", "class"), prefix=1)
    np.testing.assert_allclose(got[0], expected, rtol=1e-12)
    np.testing.assert_allclose(got[1:, 1:], patch_step, rtol=1e-12)
    np.testing.assert_allclose(class_rows([sa[None], ca[None]], kinds=("patches", "class"))[0], expected, rtol=1e-12)
    # Chefer's update: the class row gains ā [e_0; I + Ā_sa]
    from explainer.methods.transformer_attribution import relevance

    g_sa, g_ca = np.array([[[1.0, -2.0], [0.5, 3.0]]]), np.array([[[2.0, 1.0, -1.0]]])
    cam_sa, cam_ca = np.maximum(g_sa * sa, 0)[0], np.maximum(g_ca * ca, 0)[0, 0]
    r_sa = np.eye(2) + cam_sa
    expected = np.array([1.0, 0, 0]) * (1 + cam_ca[0]) + cam_ca[1:] @ np.hstack([np.zeros((2, 1)), r_sa])
    r = relevance([torch.from_numpy(sa[None]), torch.from_numpy(ca[None])],
                  [torch.from_numpy(g_sa[None]), torch.from_numpy(g_ca[None])], ("patches", "class"), 1, 3)
    np.testing.assert_allclose(r[0, 0].numpy(), expected, rtol=1e-12)


# against the reference on the timm model ----------------------------------------------------------
def _check_rollout(family, layer_scale, exporter, chelsea, report):
    """Every option against the reference: the library's rollout of the graph's probabilities (one
    onnxruntime pass) at the patch grid, and the public map for two of them (the grid resized)."""
    from explainer.methods._attention import self_attention
    from explainer.methods.attention_rollout import rollout

    net = _net(family, layer_scale, exporter)
    pixels = net.fit_pixels(chelsea.astype(np.float32))
    found = self_attention(net, "test")
    probs = net.ort.run(net.to_model_input(pixels[None]), list(found.softmaxes))
    probs = [np.asarray(p).reshape(-1, *found.shape(k)) for p, k in zip(probs, found.kinds)]
    sa, ca, _, _ = _timm_attention(_model(family, layer_scale), pixels)
    assert len(ca) == 2 and sa[0].shape[-1] == 196
    kinds = ("patches",) * len(sa) + ("class",) * len(ca)
    assert found.kinds == kinds
    for head_fusion in ("mean", "max", "min"):
        for discard in (0.0, 0.9):
            for normalisation in ("rows", "vit-explain"):
                ref = _reference_rollout(sa, ca, head_fusion, discard, normalisation)
                # the library's rollout of timm's own probabilities: the same arithmetic, exactly
                same = rollout([*sa, *ca], head_fusion, discard, normalisation, kinds, 1)[0, 1:]
                np.testing.assert_allclose(same, ref, rtol=1e-9, atol=1e-12)
                grid = rollout(probs, head_fusion, discard, normalisation, found.kinds, found.prefix)[0, 1:]
                corr = _corr(grid, ref)
                report.append((family, layer_scale, exporter, head_fusion, discard, normalisation, corr,
                               float(np.abs(grid - ref).max()), float(np.abs(ref).max())))
                # the graph's probabilities (onnxruntime) differ from the module's in float32: close; but
                # discarding 90 % of each block's entries, an entry at the boundary falls on either side
                # (a few per block, through 24 blocks at the published size: 0.2 % of the maximum)
                tol = 1e-2 if discard else 1e-4
                np.testing.assert_allclose(grid, ref, rtol=tol, atol=tol * float(np.abs(ref).max()))
                assert corr >= 0.999, (head_fusion, discard, normalisation, corr)
                if (head_fusion, discard, normalisation) in (("mean", 0.0, "rows"), ("max", 0.9, "vit-explain")):
                    public = explainer.attention_rollout(net, chelsea, [285, 281], head_fusion=head_fusion,
                                                         discard_ratio=discard, normalisation=normalisation)
                    assert public.shape == (2, *chelsea.shape[:2]) and public.dtype == np.float32
                    expected = resize_map(grid.reshape(1, 14, 14).astype(np.float32), chelsea.shape[:2])
                    np.testing.assert_allclose(public, np.repeat(expected, 2, axis=0), rtol=1e-5, atol=1e-7)


def _check_chefer(family, layer_scale, exporter, chelsea, report):
    from explainer.methods.transformer_attribution import TransformerAttribution

    net = _net(family, layer_scale, exporter)
    pixels = net.fit_pixels(chelsea.astype(np.float32))
    method = TransformerAttribution(net)
    method.setup([pixels], LABELS)
    grids = method.explain(pixels, LABELS).astype(np.float64)
    public = explainer.transformer_attribution(net, chelsea, LABELS)
    assert public.shape == (2, *chelsea.shape[:2]) and public.dtype == np.float32
    np.testing.assert_allclose(public, resize_map(grids.astype(np.float32), chelsea.shape[:2]), rtol=1e-5,
                               atol=1e-6 * float(np.abs(grids).max()))
    for k, label in enumerate(LABELS):
        ref = _reference_chefer(*_timm_attention(_model(family, layer_scale), pixels, label))
        corr = _corr(grids[k], ref)
        report.append((family, layer_scale, exporter, label, corr, float(np.abs(grids[k].ravel() - ref).max()),
                       float(np.abs(ref).max())))
        np.testing.assert_allclose(grids[k].ravel(), ref, rtol=1e-3, atol=1e-3 * float(np.abs(ref).max()))
        assert corr >= 0.999, (label, corr)
    assert not np.allclose(grids[0], grids[1])  # class-specific


@pytest.mark.parametrize("family,layer_scale,exporter", SMALL)
def test_rollout_on_cait_equals_the_reference(family, layer_scale, exporter, chelsea):
    _check_rollout(family, layer_scale, exporter, chelsea, [])


@pytest.mark.parametrize("family,layer_scale,exporter", SMALL)
def test_transformer_attribution_on_cait_equals_the_reference(family, layer_scale, exporter, chelsea):
    _check_chefer(family, layer_scale, exporter, chelsea, [])


# AttnLRP: lxt's rules in the timm module ----------------------------------------------------------
def _lxt():
    from test_attn_lrp import _lxt as lxt

    return lxt()


@functools.cache
def _lxt_model(family, layer_scale):
    """The timm CaiT with lxt's AttnLRP rules: lxt's ``wrap_attention_forward`` on both kinds of
    attention (gradients at queries and keys divided by 4, at values by 2: the uniform rule at the
    query-key and the attention-value products; the talking-heads mixings between them are linear,
    so their plain gradient is the epsilon rule, and so is the Softmax's), lxt's ``layer_norm_forward``
    on every LayerNorm, ``non_linear_forward`` on every GELU."""
    _, patches = _lxt()
    model = _build(family, layer_scale)

    def talking_heads(self, x):  # timm's TalkingHeadAttn.forward, q, k and v through lxt's wrapper
        def inner(module, q, k, v):
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = self.proj_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).softmax(dim=-1)
            attn = self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            return attn @ v

        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = patches.wrap_attention_forward(inner)(self, q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))

    def class_attention(self, x):  # timm's ClassAttn.forward, q, k and v through lxt's wrapper
        b, n, c = x.shape
        h = self.num_heads
        q = self.q(x[:, 0]).unsqueeze(1).reshape(b, 1, h, c // h).permute(0, 2, 1, 3)
        k = self.k(x).reshape(b, n, h, c // h).permute(0, 2, 1, 3)
        v = self.v(x).reshape(b, n, h, c // h).permute(0, 2, 1, 3)
        out = patches.wrap_attention_forward(lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v))(self, q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, 1, c))

    from test_attn_lrp import lxt_patched

    return lxt_patched(model, {"TalkingHeadAttn": talking_heads, "ClassAttn": class_attention})


def _check_attn_lrp(family, layer_scale, exporter, chelsea, report):
    from explainer.methods.attn_lrp import raw

    net = _net(family, layer_scale, exporter)
    pixels = net.fit_pixels(chelsea.astype(np.float32))
    engine = torch_engine(net)
    x = engine.pixel_model.model_input(engine.tensor(pixels).permute(2, 0, 1)[None])
    grid, scores = raw(engine, x, LABELS)
    grid = grid.sum(1).numpy().astype(np.float64)
    model = _lxt_model(family, layer_scale)
    plain = _model(family, layer_scale)
    for k, label in enumerate(LABELS):
        xt = _normalised(pixels).requires_grad_(True)
        out = model(xt)
        with torch.no_grad():  # lxt's rules change gradients only
            assert float(out[0, label]) == pytest.approx(float(plain(_normalised(pixels))[0, label]), rel=1e-5)
        g, = torch.autograd.grad(out[0, label], xt)
        ref = (xt * g)[0].sum(0).detach().numpy().astype(np.float64)
        assert float(scores[k]) == pytest.approx(float(out[0, label].detach()), rel=1e-4)
        corr = _corr(grid[k], ref)
        patch_corr = _corr(*[m.reshape(14, 16, 14, 16).sum((1, 3)) for m in (grid[k], ref)])
        # conservation: input, biases and the softmax rule's loss add up to the logit
        book = _lrp.relevance(engine.graph_module, _lrp.engine_plan(engine), x,
                              lambda o, label=label: o.reshape(1, -1)[0, label], account=True)
        total = float(book["input"].sum()) + book["biases"] + book["softmax"]
        report.append((family, layer_scale, exporter, label, corr, patch_corr, float(np.abs(grid[k] - ref).max()),
                       float(np.abs(ref).max()), book["score"], total - book["score"], float(book["input"].sum())))
        np.testing.assert_allclose(grid[k], ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
        assert corr >= 0.999 and patch_corr >= 0.999, (label, corr, patch_corr)
        assert total == pytest.approx(book["score"], rel=1e-4, abs=1e-6)
    public = explainer.attn_lrp(net, chelsea, LABELS)
    assert public.shape == (2, *chelsea.shape[:2]) and public.dtype == np.float32
    np.testing.assert_allclose(public, resize_map(grid.astype(np.float32), chelsea.shape[:2]), rtol=1e-4,
                               atol=1e-5 * np.abs(grid).max())


@pytest.mark.parametrize("family,layer_scale,exporter", SMALL)
def test_attn_lrp_on_cait_equals_lxt_and_conserves(family, layer_scale, exporter, chelsea):
    _check_attn_lrp(family, layer_scale, exporter, chelsea, [])


@pytest.mark.parametrize("family,layer_scale,exporter", PUBLISHED)
def test_all_three_on_cait_at_its_published_size(family, layer_scale, exporter, chelsea):
    report = []
    _check_rollout(family, layer_scale, exporter, chelsea, report)
    _check_chefer(family, layer_scale, exporter, chelsea, report)
    _check_attn_lrp(family, layer_scale, exporter, chelsea, report)


def test_talking_heads_are_attention_and_a_square_head_is_not():
    """The data flow alone: scores of two image-dependent operands mixed across heads by a constant
    square matrix (between Transposes), then the Softmax, is attention; a Softmax over the image times
    a constant square matrix (a classifier head as wide as its input) is not, nor is one behind two
    mixings."""
    from onnx import helper, numpy_helper

    from explainer.model.structure import attention_tensors, image_dependent

    square = numpy_helper.from_array(np.eye(2, dtype=np.float32), "mix")

    def found(nodes):
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [2, 3, 3])],
                                  [helper.make_tensor_value_info(nodes[-1].output[0], 1, None)], [square])
        return attention_tensors(graph, image_dependent(graph, "x"))

    scores = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
              helper.make_node("MatMul", ["x", "xt"], ["s"]),  # (heads 2, 3, 3)
              helper.make_node("Transpose", ["s"], ["s_last"], perm=[1, 2, 0]),
              helper.make_node("MatMul", ["s_last", "mix"], ["mixed"]),
              helper.make_node("Transpose", ["mixed"], ["s_first"], perm=[2, 0, 1])]
    talking = scores + [helper.make_node("Softmax", ["s_first"], ["a"], axis=-1)]
    assert {"s", "mixed", "s_first", "a"} <= found(talking)
    twice = scores + [helper.make_node("Transpose", ["s_first"], ["again"], perm=[1, 2, 0]),
                      helper.make_node("MatMul", ["again", "mix"], ["mixed2"]),
                      helper.make_node("Softmax", ["mixed2"], ["a"], axis=-1)]
    assert "a" not in found(twice)
    head = [helper.make_node("Transpose", ["x"], ["x_last"], perm=[1, 2, 0]),
            helper.make_node("MatMul", ["x_last", "mix"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["p"], axis=-1)]
    assert not found(head)
