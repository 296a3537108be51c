"""Recipro-CAM (and ViT-ReciproCAM on token layers) against an independent Recipro-CAM written here from
the papers, in torch on the source modules the ONNX files were exported from (tests/exports.py): the
backbone to the feature layer, h*w masked copies of the features through the module's own head, the
class's softmax score per location, min-max scaled. The masks are made here by convolving one-hot
maps with the kernel (the library builds them by slicing a padded kernel). OpenVINO XAI's
ReciproCAM/ViTReciproCAM on the same files: benchmarks/recipro_cam.py (map correlation there)."""
import numpy as np
import onnx
import pytest
import torch

import explainer
from explainer.errors import LayerNotFeatureMapError
from explainer.methods.gradcam import default_feature_layer
from explainer.errors import HeadSplitError
from explainer.methods.recipro_cam import head_of, low_resolution, recipro_cam, recipro_cam_on

import exports
import references

KERNELS = {"point": np.array([[0, 0, 0], [0, 1, 0], [0, 0, 0]], np.float64),
           "gaussian": np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float64) / 16}


def reference_masks(h: int, w: int, kernel: str) -> torch.Tensor:
    """(h*w, h, w): the one-hot map of each location (row-major) convolved with the kernel, zero padded."""
    onehot = torch.eye(h * w, dtype=torch.float64).reshape(h * w, 1, h, w)
    k = torch.from_numpy(KERNELS[kernel])[None, None]
    return torch.nn.functional.conv2d(onehot, k, padding=1)[:, 0]


def min_max(cam: torch.Tensor) -> np.ndarray:
    cam = cam.double()
    return ((cam - cam.min()) / (cam.max() - cam.min())).numpy()


def model_input(net, image) -> torch.Tensor:
    return torch.from_numpy(net.to_model_input(net.fit_pixels(image)[None])).float()


@pytest.fixture(scope="module")
def resnet():
    return explainer.load(exports.export("resnet18", "legacy")), exports.build("resnet18")


@pytest.fixture(scope="module")
def vit():
    return explainer.load(exports.export("vit_tiny", "legacy")), exports.build("vit_tiny")


def resnet_reference(model, x, label: int, scores: str = "probabilities") -> np.ndarray:
    """Recipro-CAM of torchvision's ResNet at ``layer4``: its output masked per location, then avgpool,
    flatten and fc."""
    with torch.no_grad():
        f = model.layer4(model.layer3(model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x))))))))
        _, c, h, w = f.shape
        masked = f * reference_masks(h, w, "point").float()[:, None]
        logits = model.fc(torch.flatten(model.avgpool(masked), 1))
        s = logits.softmax(dim=1) if scores == "probabilities" else logits
    return min_max(s[:, label].reshape(h, w))


def vit_reference(model, x, label: int, kernel: str = "gaussian", scores: str = "probabilities") -> np.ndarray:
    """ViT-ReciproCAM of timm's VisionTransformer at the last block (arXiv 2310.02588, as OpenVINO XAI
    inserts it): the block's input tokens and its first LayerNorm's output masked alike per location,
    the class token kept, then the rest of the block, the final norm and the head."""
    with torch.no_grad():
        t = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        for block in model.blocks[:-1]:
            t = block(t)
        last = model.blocks[-1]
        n = last.norm1(t)
        side = int(round((t.shape[1] - 1) ** 0.5))
        keep = torch.cat([torch.ones(side * side, 1, dtype=torch.float64),
                          reference_masks(side, side, kernel).reshape(side * side, -1)], dim=1).float()[..., None]
        tm, nm = t * keep, n * keep
        y = tm + last.drop_path1(last.ls1(last.attn(nm)))
        y = y + last.drop_path2(last.ls2(last.mlp(last.norm2(y))))
        logits = model.forward_head(model.norm(y))
        s = logits.softmax(dim=1) if scores == "probabilities" else logits
    return min_max(s[:, label].reshape(side, side))


def test_cnn_equals_reference_on_the_source_module(resnet, chelsea):
    """ResNet-18 at its last block's output (the default layer), probabilities and logits, against the
    torch reference on the module it was exported from; the public map is the low-resolution one
    upsampled bicubically and clamped at 0."""
    net, model = resnet
    layer = net.layer("/layer4/layer4.1/relu_1/Relu")
    x = model_input(net, chelsea)
    small = net.fit_pixels(chelsea)
    for scores in ("probabilities", "logits"):
        ref = resnet_reference(model, x, 285, scores)
        for path in ("in-graph", "two-stage"):
            ours = low_resolution(net, small, layer, [285], scores=scores, path=path)[0]
            assert ours.shape == ref.shape == (7, 7)
            references.assert_close_in_units(ours, ref, 1e-4, f"Recipro-CAM ({scores}, {path})")
    assert head_of(net, layer).pooled[2]  # two stages: the head after the global pool ran (checked)
    assert explainer.recipro_cam_engine(net) == "in-graph"  # the default path
    public = recipro_cam(net, chelsea, 285, verbose=False)
    expected = np.maximum(references.bicubic_upsample(resnet_reference(model, x, 285), chelsea.shape[:2]), 0)
    references.assert_close_in_units(public, expected, 1e-4, "Recipro-CAM at the image's size")


def _attention_rows(model: onnx.ModelProto) -> list[int]:
    """The query rows of each Softmax over the keys (rank 4) of a head model, run on one image of zeros."""
    import onnxruntime as ort

    model = onnx.shape_inference.infer_shapes(model)
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in model.graph.value_info}
    names = [n.output[0] for n in model.graph.node if n.op_type == "Softmax" and ranks.get(n.input[0]) == 4]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    feeds = {i.name: np.zeros([d.dim_value or 1 for d in i.type.tensor_type.shape.dim], np.float32)
             for i in probe.graph.input}
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return [int(a.shape[-2]) for a in session.run(names, feeds)]


@pytest.mark.parametrize("exporter_name", ["legacy", "legacy-dynamic"])
def test_vit_equals_reference_on_the_source_module(exporter_name, chelsea):
    """ViT-Tiny at the default layer (the last block's norm1; its input masked too), Gaussian (the
    default on tokens) and point kernels. (The residual stream's masking does not show here: the
    score reads the class token, which is kept, and the last block's patch tokens reach only their own
    outputs; OpenVINO XAI's ViTReciproCAM masks it too.) The head that runs picks the class token
    early, into the attention's queries, whether the Reshape targets are constants (batch 1) or
    computed from Shapes (dynamic batch)."""
    net, model = explainer.load(exports.export("vit_tiny", exporter_name)), exports.build("vit_tiny")
    layer = net.layer("/blocks/blocks.11/norm1/LayerNormalization")
    assert default_feature_layer(net)[0] == layer.name
    x = model_input(net, chelsea)
    small = net.fit_pixels(chelsea)
    for kernel, scores in (("auto", "probabilities"), ("point", "logits")):
        ref = vit_reference(model, x, 285, "gaussian" if kernel == "auto" else kernel, scores)
        ours = low_resolution(net, small, layer, [285], kernel=kernel, scores=scores)[0]
        assert ours.shape == ref.shape == (14, 14)
        references.assert_close_in_units(ours, ref, 1e-3, f"ViT-ReciproCAM ({kernel}, {scores})")
    # the head that ran reads the class token before the last block's MLP (checked against the whole head)
    head = head_of(net, layer)
    assert head.checked and any(n.name.startswith("recipro_early/slice") for n in head.engine.model.graph.node)
    assert _attention_rows(head.engine.model) == [1]


def test_labels_images_and_batches_share_the_runs(default_net, chelsea, coffee):
    """Several labels equal each label alone; a batch of images equals each image alone; small head
    batches (streamed) equal one batch."""
    both = recipro_cam(default_net, [chelsea, coffee], [285, 504], verbose=False)
    for b, image in enumerate((chelsea, coffee)):
        for k, label in enumerate((285, 504)):
            alone = recipro_cam(default_net, image, label, batch_size=5, verbose=False)
            np.testing.assert_allclose(both[b][k], alone, atol=1e-5)
    assert [m.shape for m in both] == [(2, *chelsea.shape[:2]), (2, *coffee.shape[:2])]
    assert all(m.min() >= 0 and 0.9 < m.max() < 1.1 for m in both)


def test_a_layer_the_head_bypasses_is_refused_naming_the_split(resnet, chelsea):
    """A layer inside a residual block (the skip connection carries the image around it) cannot be
    split: the error names the nearest layer after it that can (the block's Add), and that layer works."""
    import re

    net, _ = resnet
    with pytest.raises(HeadSplitError, match="skip connection") as caught:
        recipro_cam(net, chelsea, 285, feature_layer="/layer4/layer4.1/conv2/Conv", verbose=False)
    suggested = re.search(r"e\.g\. feature_layer='([^']+)'", str(caught.value)).group(1)
    assert suggested == "/layer4/layer4.1/Add"
    assert recipro_cam(net, chelsea, 285, feature_layer=suggested, verbose=False).shape == chelsea.shape[:2]


def test_a_head_that_reads_the_image_s_shape_runs_on_the_copies(chelsea):
    """ConvNeXt-Atto by the dynamo exporter: the library's runtime graph reads the batch size from the
    image's shape inside the head (its batch passes), which the head reads from the masked copies
    instead; the map equals the legacy export's of the same module."""
    maps = [recipro_cam(explainer.load(exports.export("convnext_atto", e)), chelsea, 285, verbose=False)
            for e in ("legacy", "dynamo")]
    np.testing.assert_allclose(maps[1], maps[0], atol=1e-5)
    assert maps[0].max() > 0.9


def test_a_layer_without_locations_is_refused(default_net, chelsea):
    with pytest.raises(LayerNotFeatureMapError, match="Recipro-CAM masks one location"):
        recipro_cam(default_net, chelsea, 285, feature_layer=default_net.output.name, verbose=False)


def _run_exported(path, net, x, **feeds):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    out = session.run(None, {net.input.name: x, **feeds})
    return dict(zip(names, out))


@pytest.mark.parametrize("family,bound", [("resnet", 1e-5), ("vit", 3e-3)])
def test_exported_graph_equals_the_library(request, tmp_path, chelsea, family, bound):
    """The in-graph Recipro-CAM (explainer.export, top 3 classes) equals the library's maps at the feature
    layer's resolution, and the model's own outputs stay bit-identical. Both files were exported for
    batch 1: ViT-Tiny's 196 masked copies pass through the head's Reshapes. The ViT bound: float32
    rounding of two onnxruntime graphs (fused differently), through the softmax and the min-max scaling."""
    import onnxruntime as ort

    from explainer.export import export_explained

    net, _ = request.getfixturevalue(family)
    out = export_explained(net, tmp_path / "explained.onnx", method="recipro_cam", top_k=3)
    small = net.fit_pixels(chelsea)
    x = net.to_model_input(small[None])
    got = _run_exported(out, net, x)
    plain = ort.InferenceSession(net.source_model.SerializeToString(), providers=["CPUExecutionProvider"])
    for o in plain.get_outputs():
        np.testing.assert_array_equal(got[o.name], plain.run([o.name], {net.input.name: x})[0])
    logits = got[plain.get_outputs()[0].name][0]
    classes = [int(c) for c in got["saliency_class"][0]]
    assert classes == [int(c) for c in np.argsort(-logits)[:3]]
    layer = net.layer(default_feature_layer(net)[0])
    ours = low_resolution(net, small, layer, classes)
    assert got["saliency"].shape == (1, 3, *ours.shape[1:])
    assert float(np.abs(got["saliency"][0] - ours).max()) <= bound
    if family == "vit":  # the copies run the head that reads the class token early: one query row each
        model = onnx.load(str(out))
        attention = [n.output[0] for n in model.graph.node if n.op_type == "Softmax" and n.name.startswith("explain/")
                     and next((a.i for a in n.attribute if a.name == "axis"), -1) == -1]
        model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in attention)
        rows = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            attention, {net.input.name: x})
        assert [a.shape[:1] + a.shape[-2:] for a in rows] == [(196, 1, 197)]


def test_exported_graph_on_a_batch_with_target_classes_at_the_input_size(default_net, tmp_path, chelsea, coffee):
    """top_k=0 (an input ``target`` per image), map_size="input", a batch of two: each exported map
    equals ``recipro_cam`` on the same network-size pixels."""
    from explainer.export import export_explained

    out = export_explained(default_net, tmp_path / "explained.onnx", method="recipro_cam", top_k=0, map_size="input")
    smalls = [default_net.fit_pixels(image) for image in (chelsea, coffee)]
    got = _run_exported(out, default_net, default_net.to_model_input(np.stack(smalls)), target=np.array([285, 504]))
    assert got["saliency"].shape == (2, 1, *default_net.input_size)
    for b, (small, label) in enumerate(zip(smalls, (285, 504))):
        expected = recipro_cam(default_net, small / 255.0, label, verbose=False)
        assert float(np.abs(got["saliency"][b, 0] - expected).max()) <= 1e-5


def test_in_graph_path_equals_the_two_stage_path_and_says_why(default_net, resnet, vit, chelsea, coffee):
    """On CNNs (EfficientNet-Lite0, ResNet-18) the default path is one session of the graph with the
    exported Recipro-CAM branch; its maps equal the two-stage path's (backbone pass, then the head) for
    every class, probabilities and logits, within 1e-5 of the range (maps are in [0, 1]); so does the
    public map of a batch. ``explainer.recipro_cam_engine`` says which path runs and why: two stages with
    other kernels (point masks on tokens, the Gaussian on feature maps), with a batch_size below h*w;
    path='in-graph' is refused there."""
    from explainer.errors import InvalidParameterError

    every = list(range(1000))
    for net in (default_net, resnet[0]):
        choice = explainer.recipro_cam_engine(net)
        assert choice == "in-graph" and choice.in_graph and "onnxruntime session" in choice.describe()
        layer = net.layer(default_feature_layer(net)[0])
        small = net.fit_pixels(chelsea)
        for scores in ("probabilities", "logits"):
            one = low_resolution(net, small, layer, every, scores=scores, path="in-graph")
            two = low_resolution(net, small, layer, every, scores=scores, path="two-stage")
            assert float(np.abs(one - two).max()) <= 1e-5, scores
        batch = recipro_cam(net, [chelsea, coffee], [285, 504], verbose=False)
        for b, image in enumerate((chelsea, coffee)):
            alone = recipro_cam_on("two-stage", net, image, [285, 504], verbose=False)
            assert float(np.abs(batch[b] - alone).max()) <= 1e-5
        # a batch_size below h*w streams the copies in two stages: the same map
        np.testing.assert_allclose(recipro_cam(net, chelsea, 285, batch_size=5, verbose=False), batch[0][0], atol=1e-5)
        gaussian = explainer.recipro_cam_engine(net, kernel="gaussian")
        assert gaussian == "two-stage" and "point masks" in gaussian.reason
    token = explainer.recipro_cam_engine(vit[0], kernel="point")
    assert token == "two-stage" and not token.in_graph and "on a token layer" in token.describe()
    with pytest.raises(InvalidParameterError, match="in-graph path cannot run.*on a token layer"):
        recipro_cam_on("in-graph", vit[0], chelsea, 285, kernel="point", verbose=False)
    with pytest.raises(InvalidParameterError, match="path must be one of"):
        recipro_cam_on("fast", default_net, chelsea, 285)


def test_in_graph_probabilities_are_the_branchs_scaled_maps_where_they_equal_ours(resnet, vit, chelsea, monkeypatch):
    """On a CNN at float32 the in-graph path reads every class's map of probabilities as the branch scales
    it (``EVERY_MAP``), not the copies' scores scaled in Python: decided once against the Python scaling
    of the same call (``BRANCH_SCALING_TOLERANCE``). Those maps equal the Python-scaled ones from the copies' scores (computed
    independently here: softmax in float64, min-max per class); a branch whose maps differ (here: every
    map replaced by its square) is not read; logits are scaled in Python; token layers never read it;
    non-finite copies' scores still raise the library's error on that path."""
    from explainer.errors import NonFiniteOutputError
    from explainer.methods import recipro_cam as rc

    net = explainer.load(exports.export("resnet18", "legacy"), preprocessing="imagenet")  # decided here
    layer = net.layer(default_feature_layer(net)[0])
    choice, session, scaled, need = rc._in_graph_entry(net, layer, "auto")
    assert choice == "in-graph" and scaled
    x = net.to_model_input(net.fit_pixels(chelsea)[None])
    classes = [285, 0, 999, 504]
    calls = []
    run = rc._run_copies
    monkeypatch.setattr(rc, "_run_copies", lambda *a, **k: calls.append(tuple(a[3] if len(a) > 3 else k.get(
        "outputs", (rc.COPY_SCORES,)))) or run(*a, **k))
    got = rc.input_maps(net, layer, x, classes)
    assert calls == [(rc.COPY_SCORES, rc.EVERY_MAP)]  # the branch's maps read, in one call
    raw = run(net, session, x)[0].astype(np.float64)
    p = np.exp(raw - raw.max(axis=1, keepdims=True))
    p = (p / p.sum(axis=1, keepdims=True))[:, classes].T.reshape(len(classes), 7, 7)
    low, high = p.min(axis=(1, 2), keepdims=True), p.max(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(got, (p - low) / (high - low), atol=1e-5)
    calls.clear()
    rc.input_maps(net, layer, x, classes, scores="logits")
    assert calls == [(rc.COPY_SCORES,)]  # the copies' scores alone, scaled here
    monkeypatch.setattr(rc, "_run_copies", run)

    # a branch whose scaled maps differ from ours is not read
    other = explainer.load(exports.export("resnet18", "legacy"), preprocessing="imagenet")
    squared = lambda *a, **k: [v ** 2 if i == 1 else v for i, v in enumerate(run(*a, **k))]  # noqa: E731
    monkeypatch.setattr(rc, "_run_copies", squared)
    assert rc._in_graph_entry(other, other.layer(layer.name), "auto")[2] is False
    monkeypatch.setattr(rc, "_run_copies", run)
    # tokens: the copies' scores, always
    assert explainer.recipro_cam_engine(vit[0]) == "in-graph"
    assert rc._in_graph_entry(vit[0], vit[0].layer(default_feature_layer(vit[0])[0]), "auto")[2] is False
    # non-finite scores on the branch's path
    broken = lambda *a, **k: [np.full_like(v, np.nan) for v in run(*a, **k)]  # noqa: E731
    monkeypatch.setattr(rc, "_run_copies", broken)
    with pytest.raises(NonFiniteOutputError):
        rc.input_maps(net, layer, x, classes)


def test_in_graph_run_counts_its_copies_in_the_budget(vit, chelsea, monkeypatch):
    """The in-graph session's run counts the graph with the copies among the runs in flight, not the
    classifier's forward: on ViT-Tiny the 196 copies of the feature tokens and of the residual stream
    (197 x 192 float32 each) are alive at once, at least 2 x 196 x 197 x 192 x 4 bytes, where one
    image's forward counts about 1 MB. A budget below that run takes the two-stage path, saying so."""
    from explainer import limits
    from explainer.methods import recipro_cam as rc
    from explainer.runtime.budget import IN_FLIGHT

    net = vit[0]
    layer = net.layer(default_feature_layer(net)[0])
    choice, session, _, need = rc._in_graph_entry(net, layer, "auto")
    assert choice == "in-graph" and need >= 2 * 196 * 197 * 192 * 4 > net.ort.guard.need((1, *net.per_image_shape))
    IN_FLIGHT.peak = 0
    low_resolution(net, net.fit_pixels(chelsea), layer, [285])
    assert IN_FLIGHT.peak >= need
    monkeypatch.setattr(limits, "MAX_RUN_BYTES", need // 2)
    small = explainer.load(exports.export("vit_tiny", "legacy"))  # decided under the small budget
    choice = explainer.recipro_cam_engine(small)
    assert choice == "two-stage" and "over the run budget" in choice.reason, choice.describe()


def test_in_graph_path_on_a_token_layer_checks_the_copies_raw_scores(vit, chelsea):
    """ViT-Tiny (exported for batch 1) at its default layer with the Gaussian: one session of the graph
    with the branch (the feature tokens and the residual stream masked, the head that reads the class
    token early). The decision compares the copies' raw scores with the two-stage head's, within
    ``TOKEN_SCORES_TOLERANCE`` of their range (min-max scaled maps of near-flat classes would magnify
    float32 rounding up to 10^4-fold); on onnxruntime the maps of every class equal the two-stage
    path's (bit-identical here), and so do the copies' scores."""
    net = explainer.load(exports.export("vit_tiny", "legacy"))  # a fresh classifier: decided here
    choice = explainer.recipro_cam_engine(net)
    assert choice == "in-graph" and choice.in_graph
    assert "196 Gaussian-masked copies of the feature tokens and of the residual stream" in choice.describe()
    layer, head = _token_copies_agree(net, chelsea)
    small = net.fit_pixels(chelsea)
    every = list(range(1000))
    for scores in ("probabilities", "logits"):
        auto = low_resolution(net, small, layer, every, scores=scores)
        two_stage = low_resolution(net, small, layer, every, scores=scores, path="two-stage")
        assert float(np.abs(auto - two_stage).max()) <= 1e-5, scores
    assert head.checked  # the two-stage head that reads the class token early was checked too


def test_in_graph_path_on_a_token_layer_on_the_openvino_engine(chelsea):
    """OpenVINO f32 (ViT-Tiny, dynamic batch): in one session too; the copies' raw scores within
    ``TOKEN_SCORES_TOLERANCE`` of their range of the two-stage head's (4e-7 measured), though the min-max
    scaled maps of near-flat classes are 1e-3 of theirs apart; bf16 keeps two stages."""
    pytest.importorskip("openvino")
    net = explainer.load(exports.export("vit_tiny", "legacy-dynamic"), engine="openvino")
    choice = explainer.recipro_cam_engine(net)
    assert choice == "in-graph" and "OpenVINO f32 session" in choice.reason
    _token_copies_agree(net, chelsea)
    from explainer.runtime import openvino_engine

    if "BF16" in openvino_engine.core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        bf16 = explainer.load(exports.export("vit_tiny", "legacy-dynamic"), engine="openvino", precision="bf16")
        choice = explainer.recipro_cam_engine(bf16)
        assert choice == "two-stage" and "token layer at bf16" in choice.reason


def test_a_token_branch_that_disagrees_falls_back_to_two_stages(monkeypatch, vit, chelsea):
    """A branch whose copies' scores are not the two-stage head's (here: its masks off by one location, as
    a wrong branch would be) is not taken: two stages, the reason giving how far apart the scores are,
    and the map is the two-stage path's."""
    from explainer.export import recipro_cam as branch

    net = explainer.load(exports.export("vit_tiny", "legacy"))
    masks = branch.location_masks
    monkeypatch.setattr(branch, "location_masks", lambda grid, kernel: np.roll(masks(grid, kernel), 1, axis=0))
    choice = explainer.recipro_cam_engine(net)
    assert choice == "two-stage" and "other copies' scores than the head" in choice.reason
    expected = recipro_cam_on("two-stage", vit[0], chelsea, 285, verbose=False)
    np.testing.assert_allclose(recipro_cam(net, chelsea, 285, verbose=False), expected, atol=1e-5)


def test_a_branch_that_cannot_be_written_falls_back_to_two_stages(monkeypatch, chelsea):
    """Where the branch cannot be written (here: the writer raises as on an unfreeable batch-1 Reshape),
    the decision is two stages with the writer's reason, once per classifier, and the map is the same."""
    from explainer.errors import UnsupportedModelError
    from explainer.export import writer

    net = explainer.load()
    reference = recipro_cam(explainer.load(), chelsea, 285, verbose=False)
    calls = []

    def refuse(*args, **kwargs):
        calls.append(1)
        raise UnsupportedModelError("export: recipro_cam: the head's Reshape 'r' holds the batch size 1. Export ...")

    monkeypatch.setattr(writer, "build_explained", refuse)
    choice = explainer.recipro_cam_engine(net)
    assert choice == "two-stage" and "holds the batch size 1" in choice.reason and "Export" not in choice.reason
    np.testing.assert_allclose(recipro_cam(net, chelsea, 285, verbose=False), reference, atol=1e-5)
    assert len(calls) == 1


def test_in_graph_path_on_the_openvino_engine(default_net, chelsea):
    """engine='openvino' (f32): the in-graph path compiles the explained graph on OpenVINO; its maps equal
    the two-stage path's on the same engine and onnxruntime's (1e-4 of the range); bf16 runs in-graph too."""
    pytest.importorskip("openvino")
    net = explainer.load(engine="openvino")
    choice = explainer.recipro_cam_engine(net)
    assert choice == "in-graph" and "OpenVINO f32 session" in choice.reason
    layer = net.layer(default_feature_layer(net)[0])
    small = net.fit_pixels(chelsea)
    every = list(range(1000))
    one = low_resolution(net, small, layer, every, scores="logits", path="in-graph")
    two = low_resolution(net, small, layer, every, scores="logits", path="two-stage")
    assert float(np.abs(one - two).max()) <= 1e-5
    ort_maps = low_resolution(default_net, small, default_net.layer(layer.name), every, scores="logits")
    assert float(np.abs(one - ort_maps).max()) <= 1e-4
    # bf16 (where the CPU has it): the two graphs round apart, so the decision's check is a correlation;
    # the in-graph maps correlate with float32's as the two-stage bf16 maps do (0.998 on this machine)
    from explainer.runtime import openvino_engine

    if "BF16" not in openvino_engine.core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        return
    bf16 = explainer.load(engine="openvino", precision="bf16")
    assert explainer.recipro_cam_engine(bf16) == "in-graph"
    low = low_resolution(bf16, small, bf16.layer(layer.name), every, scores="logits")
    assert float(np.corrcoef(low.ravel(), ort_maps.ravel())[0, 1]) >= 0.99


def test_in_graph_onnxruntime_session_folds_zero_pads_and_no_session_spins(default_net, chelsea):
    """EfficientNet-Lite0's 5 zero Pads ("SAME" padding of its stride-2 convolutions) are folded into the
    Convs that read them in the library's graph (the ``fold-zero-pads`` pass: the same outputs as the
    file's, bit for bit, on onnxruntime), so the in-graph Recipro-CAM session has none either; its pool
    threads do not spin, nor do the classifier's own session's (``OrtEngine.spinning``: threads spinning
    on after a run slowed the next call of another session, ``predict`` then ``recipro_cam``)."""
    import onnx
    import onnxruntime as ort

    from explainer.convert.ops import fold_zero_pads
    from explainer.methods.recipro_cam import _in_graph_entry
    from explainer.runtime.ort_engine import OrtEngine

    source = default_net.source_model
    assert sum(n.op_type == "Pad" for n in source.graph.node) == 5
    assert not [n for n in default_net.model.graph.node if n.op_type == "Pad"]
    assert "fold-zero-pads: 5 change(s)" in default_net.normalisation_log
    model = onnx.ModelProto()
    model.CopyFrom(source)
    assert fold_zero_pads(model) == 5 and sum(n.op_type == "Pad" for n in source.graph.node) == 5
    x = default_net.to_model_input(default_net.fit_pixels(chelsea)[None])
    name = default_net.output.name
    before, after, library = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                              .run([name], {default_net.input.name: x})[0] for m in (source, model, default_net.model))
    np.testing.assert_array_equal(before, after)
    np.testing.assert_array_equal(before, library)
    layer = default_net.layer(default_feature_layer(default_net)[0])
    session = _in_graph_entry(default_net, layer, "auto")[1]
    default_net.predict(chelsea)
    for s in (session, default_net.ort.session([default_net.output.name])):
        assert s.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    spinning = OrtEngine(model, default_net.input.name, ["CPUExecutionProvider"], "t",
                         spinning=True)._session_options()
    with pytest.raises(Exception):  # onnxruntime's default: not set, the threads spin
        spinning.get_session_config_entry("session.intra_op.allow_spinning")


def test_fold_pads_adds_to_the_conv_s_own_pads_and_leaves_other_pads():
    """``fold_pads``: a zero Pad from a Constant node, asymmetric, added to the Conv's own pads (the same
    outputs); a reflecting Pad and one with a non-zero value stay."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from explainer.convert.ops import fold_zero_pads as fold_pads

    rng = np.random.default_rng(0)
    weights = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "W")
    pads = numpy_helper.from_array(np.array([0, 0, 1, 0, 0, 0, 2, 1], np.int64))
    nodes = [helper.make_node("Constant", [], ["p"], value=pads),
             helper.make_node("Pad", ["x", "p"], ["a"]),
             helper.make_node("Conv", ["a", "W"], ["y1"], strides=[2, 2], pads=[1, 1, 0, 0]),
             helper.make_node("Pad", ["x", "p"], ["b"], mode="reflect"),
             helper.make_node("Conv", ["b", "W"], ["y2"]),
             helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.array(1.0, np.float32))),
             helper.make_node("Pad", ["x", "p", "one"], ["c"]),
             helper.make_node("Conv", ["c", "W"], ["y3"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 9, 8])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in (1, 2, 3)],
                              initializer=[weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = rng.normal(size=(1, 3, 9, 8)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert fold_pads(model) == 1
    assert [n.op_type for n in model.graph.node].count("Pad") == 2
    conv = next(n for n in model.graph.node if n.output[0] == "y1")
    assert conv.input[0] == "x" and list(next(a.ints for a in conv.attribute if a.name == "pads")) == [2, 1, 2, 1]
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for a, b in zip(before, after):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_working_copy_softmax_and_scaling_equal_the_plain_expressions_bit_for_bit():
    """``classifier.softmax`` (one working array; the copies' probabilities) is the plain float64
    expression bit for bit, and ``normalise`` the plain min-max expression over the two map axes, a
    constant map zeros."""
    from explainer.methods.recipro_cam import normalise
    from explainer.runtime.classifier import softmax

    rng = np.random.default_rng(0)
    for scale in (0.1, 3.0, 40.0):
        raw = (rng.normal(size=(49, 1000)) * scale).astype(np.float32)
        z = np.exp(raw.astype(np.float64) - raw.max(axis=1, keepdims=True))
        np.testing.assert_array_equal(softmax(raw), (z / z.sum(axis=1, keepdims=True)).astype(np.float32))
    for shape in [(1000, 7, 7), (3, 14, 14), (7, 7)]:
        for dtype in (np.float64, np.float32):
            cams = rng.normal(size=shape).astype(dtype)
            if len(shape) == 3:
                cams[1] = 2.0
            low = cams.min(axis=(-2, -1), keepdims=True)
            span = cams.max(axis=(-2, -1), keepdims=True) - low
            plain = np.where(span > 0, (cams - low) / np.where(span > 0, span, 1), 0).astype(np.float32)
            np.testing.assert_array_equal(normalise(cams), plain)


def _token_copies_agree(net, chelsea):
    """(layer, head) of the default layer, after asserting that the one-session branch's copies' raw scores
    (logits) of chelsea are within ``TOKEN_SCORES_TOLERANCE`` of their range of the two-stage head's."""
    from explainer.methods import recipro_cam as rc

    layer = net.layer(default_feature_layer(net)[0])
    head, session = head_of(net, layer), rc._in_graph_entry(net, layer, "auto")[1]
    x = net.to_model_input(net.fit_pixels(chelsea)[None])
    one = rc._copy_scores(net, rc._run_copies(net, session, x)[0], "logits").astype(np.float64)
    two = rc.copy_scores(net, head, net.ort.run(x, list(head.inputs)), range(1000), kernel="gaussian",
                         scores="logits")
    assert float(np.abs(one - two).max()) <= rc.TOKEN_SCORES_TOLERANCE * float(two.max() - two.min())
    return layer, head
