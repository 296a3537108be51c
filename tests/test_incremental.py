"""Incremental occlusion (explainer.runtime.incremental): the maps equal the plain path's, computed
independently (every mask forwarded whole through the unsplit graph), on the embedded EfficientNet-Lite0,
GoogLeNet's zoo graph, graphs built here to hit each padding and stride subtlety, and the CNN families of
the compatibility suite; graphs it cannot analyse run the plain path with a named reason."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import explainer
from explainer.errors import InvalidParameterError, UnsupportedModelError
from explainer.runtime import incremental as inc

import exports

TOLERANCE = 1e-5  # relative to the largest drop of the plain maps


def _both(net, image, labels, **options):
    options = dict(output_upsampling="none", verbose=False, **options)
    ours = explainer.occlusion_sensitivity(net, image, labels, incremental=True, **options)
    decision = inc.last_decision(net)
    plain = explainer.occlusion_sensitivity(net, image, labels, incremental=False, **options)
    return ours, plain, decision


def _assert_equal_maps(ours, plain):
    assert ours.shape == plain.shape
    scale = float(np.abs(plain).max())
    assert scale > 0, "the plain maps are all zero: the test would prove nothing"
    error = float(np.abs(ours.astype(np.float64) - plain).max()) / scale
    assert error <= TOLERANCE, f"incremental maps differ from the plain ones by {error:.2e} (relative)"


def _top(net, image, k=3):
    """The k most probable classes (their maps move most); batch size 1: no batch-size measurement."""
    return [int(i) for i in np.argsort(-net.predict(image, batch_size=1), kind="stable")[:k]]


def _independent_cells(model, feed, image, labels, mask, stride, cells, softmax=True):
    """The probability drops at a few grid cells, computed without the library: the mask placed by
    hand (clipped masks centred on every stride multiple from the first pixel, as MATLAB's
    occlusionSensitivity; the image's mean colour), each occluded image run whole through a plain
    onnxruntime session of the file, ``feed(pixels)`` making its input from (N, H, W, 3) pixels."""
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString() if hasattr(model, "SerializeToString") else str(model),
                                   providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    pixels = np.asarray(image, np.float32)
    fill = pixels.reshape(-1, 3).mean(axis=0)
    batch = [pixels]
    for i, j in cells:
        occluded = pixels.copy()
        top, left = i * stride[0] - mask[0] // 2, j * stride[1] - mask[1] // 2
        occluded[max(0, top):max(0, top + mask[0]), max(0, left):max(0, left + mask[1])] = fill
        batch.append(occluded)
    scores = np.concatenate([session.run(None, {name: feed(b[None])})[0].reshape(1, -1) for b in batch])
    scores = scores.astype(np.float64)
    if softmax:
        scores = np.exp(scores - scores.max(1, keepdims=True))
        scores /= scores.sum(1, keepdims=True)
    return (scores[0, labels][None, :] - scores[1:, labels]).T  # (K, cells)


def _imagenet(pixels, nhwc=False):
    x = (pixels / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    return np.ascontiguousarray(x if nhwc else x.transpose(0, 3, 1, 2), np.float32)


def _cells(grid):
    """The corners, the centre and the cell of the largest drop (where a misplaced window shows)."""
    strongest = np.unravel_index(np.abs(grid).max(axis=0).argmax(), grid.shape[1:])
    last = (grid.shape[1] - 1, grid.shape[2] - 1)
    return sorted({(0, 0), (grid.shape[1] // 2, grid.shape[2] // 2), last, tuple(int(v) for v in strongest)})


def _assert_cells(grid, drops, cells):
    got = np.stack([grid[:, i, j] for i, j in cells], axis=1)
    scale = float(np.abs(drops).max())
    if float(np.abs(grid).max()) < 1e-5:
        # seeded weights whose probabilities hardly move (MobileNetV3's and GoogLeNet's exports: the
        # largest drop 1e-7): below float rounding the cells can only agree that nothing moves
        assert scale < 1e-5, (got, drops)
        return
    assert scale > 1e-6, "the checked cells drop nothing: the comparison would prove nothing"
    # the same graph on both sides: the drops agree to float rounding, relative to the largest, but
    # for 1e-6 of a probability (the pixels normalised in float64 here, in float32 by the library:
    # 2.5e-7 measured on a seeded EfficientNet-B0 whose drops are all below 1e-4)
    error = float(np.abs(got - drops).max())
    assert error <= 1e-6 + 1e-4 * scale, (error, got, drops)


# the embedded default and GoogLeNet's graph ---------------------------------------------------------
@pytest.mark.parametrize("mask,stride,clipping", [(15, 37, True), (40, 50, False), (30, 20, True)],
                         ids=["stride>mask-clipped", "inside", "overlapping"])
def test_efficientnet_lite0_equals_plain(default_net, chelsea, mask, stride, clipping):
    labels = _top(default_net, chelsea)
    ours, plain, decision = _both(default_net, chelsea, labels, mask_size=mask, stride=stride,
                                  mask_clipping=clipping)
    assert decision.incremental and decision.cuts, decision.reason
    _assert_equal_maps(ours, plain)
    if clipping:  # against a loop of our own over onnxruntime (the model's input as the TF reference's),
        # on the network-size pixels the library occluded
        cells = _cells(ours)
        drops = _independent_cells(default_net.source_model, lambda p: ((p - 127.0) / 128.0).transpose(0, 3, 1, 2),
                                   default_net.prepare(chelsea)[0][0], labels, (mask, mask), (stride, stride), cells)
        _assert_cells(ours, drops, cells)


def test_googlenet_graph_equals_plain(googlenet_graph, chelsea):
    labels = _top(googlenet_graph, chelsea, 2)
    for clipping in (True, False):
        ours, plain, decision = _both(googlenet_graph, chelsea, labels, mask_size=(25, 19), stride=(61, 53),
                                      mask_clipping=clipping)
        assert decision.incremental and decision.cuts, decision.reason
        _assert_equal_maps(ours, plain)


def test_every_border_mask_of_the_default(default_net, coffee):
    """Masks along all four borders (clipped and not) at every stride phase: the crops that touch the
    image's border see its padding, the others real neighbours."""
    label = _top(default_net, coffee, 1)[0]
    ours, plain, _ = _both(default_net, coffee, label, mask_size=(9, 23), stride=(53, 71), mask_clipping=True)
    _assert_equal_maps(ours, plain)


# graphs built here: every padding, stride and layout subtlety ---------------------------------------
def _conv(rng, name, x, cin, cout, k, **attrs):
    w = (rng.standard_normal((cout, cin // attrs.get("group", 1), *k)) / np.sqrt(cin * k[0] * k[1])).astype(np.float32)
    b = (0.1 * rng.standard_normal(cout)).astype(np.float32)
    return ([helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [name], name=name, kernel_shape=list(k), **attrs)],
            [numpy_helper.from_array(w, f"{name}_w"), numpy_helper.from_array(b, f"{name}_b")])


def _odd_cnn(size=(61, 67), nhwc_uint8=False, classes=5):
    """A CNN with what exactness must survive: SAME_UPPER and SAME_LOWER convs with odd strides,
    dilation, asymmetric explicit pads, a ceil-mode max pool, an average pool that does not count its
    padding, a constant Pad, residual Add, channel Concat and LRN; optionally behind an NHWC uint8 input
    normalised in the graph."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    x = "image"
    h, w = size
    if nhwc_uint8:
        inits += [numpy_helper.from_array(np.array([120.0, 110.0, 100.0], np.float32).reshape(1, 3, 1, 1), "mean"),
                  numpy_helper.from_array(np.array(60.0, np.float32), "std")]
        nodes += [helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
                  helper.make_node("Transpose", ["f"], ["t"], perm=[0, 3, 1, 2]),
                  helper.make_node("Sub", ["t", "mean"], ["s"]), helper.make_node("Div", ["s", "std"], ["x0"])]
        x = "x0"
    inits += [numpy_helper.from_array(np.array([0, 0, 1, 0, 0, 0, 2, 1], np.int64), "pads"),
              numpy_helper.from_array(np.array(0.5, np.float32), "pad_value"),
              numpy_helper.from_array((0.05 * rng.standard_normal((classes, 16))).astype(np.float32), "fc_w"),
              numpy_helper.from_array(np.zeros(classes, np.float32), "fc_b")]
    for part in (_conv(rng, "c1", x, 3, 8, (3, 3), strides=[2, 2], auto_pad="SAME_UPPER"),
                 ([helper.make_node("Relu", ["c1"], ["r1"])], []),
                 _conv(rng, "c2", "r1", 8, 8, (3, 3), pads=[2, 2, 2, 2], dilations=[2, 2]),
                 _conv(rng, "c3", "r1", 8, 8, (1, 1)),
                 ([helper.make_node("Add", ["c2", "c3"], ["sum"]),
                   helper.make_node("Concat", ["sum", "r1"], ["cat"], axis=1),
                   helper.make_node("LRN", ["cat"], ["lrn"], size=3),
                   helper.make_node("MaxPool", ["lrn"], ["mp"], kernel_shape=[3, 3], strides=[2, 2],
                                    pads=[0, 1, 1, 0], ceil_mode=1),
                   helper.make_node("AveragePool", ["mp"], ["pool"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                                    count_include_pad=0)], []),
                 _conv(rng, "c4", "pool", 16, 12, (3, 2), strides=[1, 3], auto_pad="SAME_LOWER"),
                 ([helper.make_node("Pad", ["c4", "pads", "pad_value"], ["padded"], mode="constant")], []),
                 _conv(rng, "c5", "padded", 12, 16, (3, 3), strides=[2, 2], group=4),
                 ([helper.make_node("Sigmoid", ["c5"], ["act"]),
                   helper.make_node("GlobalAveragePool", ["act"], ["gap"]),
                   helper.make_node("Flatten", ["gap"], ["flat"]),
                   helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1)], [])):
        nodes += part[0]
        inits += part[1]
    shape = ["N", h, w, 3] if nhwc_uint8 else ["N", 3, h, w]
    graph = helper.make_graph(nodes, "odd", [helper.make_tensor_value_info(
        "image", TensorProto.UINT8 if nhwc_uint8 else TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("nhwc_uint8", [False, True], ids=["nchw-float", "nhwc-uint8-normalised-in-graph"])
def test_padding_stride_and_layout_subtleties(nhwc_uint8, chelsea):
    net = explainer.load(_odd_cnn(nhwc_uint8=nhwc_uint8), preprocessing="none" if nhwc_uint8 else "imagenet")
    split = inc.split_of(net)
    assert split.candidates, split.reason
    for mask, stride, clipping in [(5, 3, True), (7, 9, False), ((4, 11), (13, 2), True)]:
        ours, plain, decision = _both(net, chelsea, [0, 1, 2, 3, 4], mask_size=mask, stride=stride,
                                      mask_clipping=clipping)
        assert decision.incremental, decision.reason
        _assert_equal_maps(ours, plain)


def test_receptive_fields_from_attributes():
    net = explainer.load(_odd_cnn(), preprocessing="imagenet")
    g = inc.split_of(net).analysis.geometry
    # c1: 3x3 stride 2 SAME_UPPER on 61 rows: total padding 2 -> 1 above
    assert g["c1"].h == inc.Axis(2, -1, 3)
    # c2: dilation 2, pads 2 -> field 3 + 2*2*2 = 11, offset -1 - 2*2 = -5; the Add unites it with c3
    assert g["c2"].h == inc.Axis(2, -5, 11) and g["sum"].h == inc.Axis(2, -5, 11)
    # the max pool's asymmetric pads: 0 rows above, 1 column left
    assert g["mp"].h == inc.Axis(4, -5, 15) and g["mp"].w == inc.Axis(4, -7, 15)
    assert "GlobalAveragePool" in inc.split_of(net).analysis.reason


# compatibility-suite families -----------------------------------------------------------------------
CNN_FAMILIES = ["resnet18", "mobilenet_v3_small", "googlenet", "efficientnet_b0", "convnext_atto", "regnetx_002",
                "densenet121"]
FAST = {("resnet18", "legacy", "plain"), ("regnetx_002", "legacy", "plain")}
CASES = [(f, "legacy", "plain") for f in CNN_FAMILIES] + [
    ("resnet18", "dynamo-dynamic", "plain"), ("resnet18", "legacy", "production"),
    ("resnet18", "legacy", "ingraph-nhwc-float"), ("resnet18", "dynamo", "ingraph-nchw-uint8"),
    ("efficientnet_b0", "dynamo", "plain"), ("mobilenet_v3_small", "legacy", "int8-qdq")]


@pytest.mark.parametrize("case", [pytest.param(c, marks=() if c in FAST else pytest.mark.slow, id="-".join(c))
                                  for c in CASES])
def test_compatibility_cnns_equal_plain(case, chelsea):
    net = explainer.load(str(exports.export(*case)))
    labels = _top(net, chelsea, 2)
    h, w = net.input.size
    mask, stride = (h // 5, w // 4), (h // 3, w // 4 + 3)
    ours, plain, decision = _both(net, chelsea, labels, mask_size=mask, stride=stride, mask_clipping=True,
                                  batch_size=4)
    # the split path ran (incremental=True never falls back silently: it raises), and equals the plain one
    assert decision.incremental and decision.cuts, decision.reason
    _assert_equal_maps(ours, plain)
    # ... and a loop of our own over onnxruntime on the file, at a few cells, on the network-size pixels
    # the library occluded
    variant = case[2]
    if variant == "production":
        feed = lambda p: np.rint(p).astype(np.uint8)  # noqa: E731  (NHWC uint8: the fill colour rounded)
    elif variant.startswith("ingraph"):
        _, layout, dtype = variant.split("-")

        def feed(p):  # pixels as they are, in the graph's layout; uint8: the fill colour rounded
            p = p if layout == "nhwc" else p.transpose(0, 3, 1, 2)
            return np.ascontiguousarray(np.rint(p).astype(np.uint8) if dtype == "uint8" else p.astype(np.float32))
    else:
        feed = _imagenet
    cells = _cells(ours)
    drops = _independent_cells(exports.export(*case), feed, net.prepare(chelsea)[0][0], labels, mask, stride, cells,
                               softmax=variant != "production")
    _assert_cells(ours, drops, cells)


# what cannot be analysed ----------------------------------------------------------------------------
def _resize_first():
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
             numpy_helper.from_array((0.1 * rng.standard_normal((4, 3, 3, 3))).astype(np.float32), "w"),
             numpy_helper.from_array((0.1 * rng.standard_normal((4, 3))).astype(np.float32), "fc")]
    nodes = [helper.make_node("Resize", ["image", "", "scales"], ["big"], name="upsample", mode="linear"),
             helper.make_node("Conv", ["big", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["logits"])]
    graph = helper.make_graph(nodes, "resize",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_few_masks_run_plain_under_auto(default_net, chelsea):
    explainer.occlusion_sensitivity(default_net, chelsea, 0, mask_size=56, stride=56, verbose=False)
    decision = inc.last_decision(default_net)
    assert not decision.incremental and "16 masks: fewer than" in decision.reason


def test_unanalysable_graph_runs_plain_with_a_named_reason(chelsea):
    net = explainer.load(_resize_first(), preprocessing="imagenet")
    auto = explainer.occlusion_sensitivity(net, chelsea, 0, mask_size=2, stride=2, verbose=False)
    decision = inc.last_decision(net)
    assert not decision.incremental and "Resize node 'upsample'" in decision.reason
    plain = explainer.occlusion_sensitivity(net, chelsea, 0, mask_size=2, stride=2, verbose=False, incremental=False)
    assert np.array_equal(auto, plain)
    with pytest.raises(UnsupportedModelError, match="Resize node 'upsample'"):
        explainer.occlusion_sensitivity(net, chelsea, 0, mask_size=8, stride=8, verbose=False, incremental=True)


@pytest.mark.slow
def test_vision_transformer_runs_plain_with_a_named_reason(chelsea):
    net = explainer.load(str(exports.export("vit_tiny", "legacy", "plain")))
    explainer.occlusion_sensitivity(net, chelsea, 0, mask_size=112, stride=112, verbose=False)
    decision = inc.last_decision(net)
    assert not decision.incremental and "not spatially local" in decision.reason


def test_torch_backend_and_option_values(default_net, chelsea):
    with pytest.raises(InvalidParameterError, match="incremental=True runs on onnxruntime"):
        explainer.occlusion_sensitivity(default_net, chelsea, 0, backend="torch", incremental=True)
    assert explainer.get_method("occlusion").parse_options({"incremental": "false"}) == {"incremental": False}


def test_auto_decides_once_and_remembers(default_net, chelsea):
    """'auto' races the plain path and the best splits on the first batches of the real work, then
    keeps the choice (per model, mask geometry, batch size and machine); the decision says what was
    measured."""
    options = dict(mask_size=30, stride=16, verbose=False, output_upsampling="none", batch_size=4)  # 196 masks
    first = explainer.occlusion_sensitivity(default_net, chelsea, 285, **options)
    decision = inc.last_decision(default_net)
    assert "plain" in decision.seconds_per_mask and len(decision.seconds_per_mask) >= 2, decision
    faster = "faster" in decision.reason and "not faster" not in decision.reason
    assert decision.reason and decision.incremental == faster
    if decision.incremental:
        assert set(decision.parts) == {"prefix", "paste", "suffix"}
    again = explainer.occlusion_sensitivity(default_net, chelsea, 285, **options)
    assert inc.last_decision(default_net) is decision
    plain = explainer.occlusion_sensitivity(default_net, chelsea, 285, incremental=False, **options)
    _assert_equal_maps(first, plain)
    _assert_equal_maps(again, plain)


def test_auto_batch_of_the_incremental_path_is_its_own_measurement(monkeypatch, tmp_path, chelsea):
    """batch_size='auto' on a decided split runs at the split's own best batch of mask positions, measured
    once (``ort_engine.fastest_batch`` over ``stream_throughput`` of the split's forward; faked here: the
    fastest at 16) and remembered, not at the plain forward's (1 here); the maps are the same at any
    batch size."""
    from explainer.methods import occlusion
    from explainer.runtime import ort_engine

    monkeypatch.setenv("ONNX_EXPLAINER_CACHE", str(tmp_path))
    monkeypatch.setattr(ort_engine.OrtEngine, "parallel_streams", lambda self: 2)
    net = explainer.load(_odd_cnn(), preprocessing="imagenet", batch_size=1)  # the plain path's batch: 1
    measured = []

    def fake_throughput(run, size, streams):
        out = run()  # the split's forward on ``size`` mask positions
        measured.append((size, len(out), streams))
        return {16: 10.0}.get(size, float(size.bit_length()))

    monkeypatch.setattr(ort_engine, "stream_throughput", fake_throughput)
    streamed = []
    real = occlusion.stream_probabilities
    monkeypatch.setattr(occlusion, "stream_probabilities",
                        lambda *args, **kw: (streamed.append(kw["batch_size"]), real(*args, **kw))[1])
    options = dict(mask_size=5, stride=3, verbose=False, output_upsampling="none", incremental=True)
    maps = [explainer.occlusion_sensitivity(net, chelsea, [0, 3], **options) for _ in range(3)]
    assert inc.last_decision(net).incremental
    assert measured == [(b, b, 2) for b in ort_engine.BATCH_CANDIDATES], measured  # once, every candidate
    assert streamed[1:] == [16, 16] and streamed[0] in (1, 16), streamed  # the first may race at the plain batch
    assert list(net.runtime.incremental_batches.values()) == [16]
    one = explainer.occlusion_sensitivity(net, chelsea, [0, 3], batch_size=1, **options)
    many = explainer.occlusion_sensitivity(net, chelsea, [0, 3], batch_size=64, **options)
    assert streamed[-2:] == [1, 64]
    for other in maps + [many]:
        assert np.max(np.abs(other - one)) <= 1e-6
    plain = explainer.occlusion_sensitivity(net, chelsea, [0, 3], **{**options, "incremental": False})
    assert streamed[-1] == 1  # the plain path keeps the plain forward's batch
    _assert_equal_maps(maps[-1], plain)


def test_a_stored_decision_this_analysis_cannot_build_is_measured_again(monkeypatch, tmp_path, chelsea):
    """A decision in the cache folder whose cuts this version of the analysis cannot build (named by
    another version: an EfficientNet-Lite0 entry of tensor names where the split now names cuts 'r8')
    is decided again, not an error under incremental=True nor a silent plain path under 'auto'; the
    new decision replaces it."""
    import json

    monkeypatch.setenv("ONNX_EXPLAINER_CACHE", str(tmp_path))
    options = dict(mask_size=5, stride=3, verbose=False, output_upsampling="none", batch_size=4)
    net = explainer.load(_odd_cnn(), preprocessing="imagenet")
    explainer.occlusion_sensitivity(net, chelsea, 0, incremental=True, **options)
    stored = tmp_path / "incremental.json"
    entries = json.loads(stored.read_text())
    assert entries and all(e["incremental"] for e in entries.values())
    for entry in entries.values():  # as another version of the analysis wrote them
        entry["cuts"] = [f"/another/version/{c}" for c in entry["cuts"]]
        entry["candidates"] = []
    stored.write_text(json.dumps(entries))
    again = explainer.load(_odd_cnn(), preprocessing="imagenet")  # nothing remembered in the process
    ours = explainer.occlusion_sensitivity(again, chelsea, 0, incremental=True, **options)
    decision = inc.last_decision(again)
    assert decision.incremental and not any(c.startswith("/another/") for c in decision.cuts), decision
    rewritten = json.loads(stored.read_text())
    assert not any(c.startswith("/another/") for e in rewritten.values() for c in e["cuts"]), rewritten
    plain = explainer.occlusion_sensitivity(again, chelsea, 0, incremental=False, **options)
    _assert_equal_maps(ours, plain)
