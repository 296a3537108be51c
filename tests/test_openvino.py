"""The OpenVINO engine (explainer.runtime.openvino_engine): at precision f32 every forward-only method
gives onnxruntime's maps on the same file (independent truth: onnxruntime on the same graph),
probabilities within 1e-5 and maps within 1e-4 of the largest value, on the embedded EfficientNet-Lite0
and a small CNN built here; bf16 is checked loosely (it rounds); engine='auto' measures once and
remembers; without the package the option's error names the install."""
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import explainer
from explainer import evaluate
from explainer.errors import DeviceError, InvalidParameterError
from explainer.runtime import openvino_engine

PROBABILITY_TOLERANCE = 1e-5
MAP_TOLERANCE = 1e-4  # relative to the largest absolute value of onnxruntime's map


def _cnn(size=(32, 32), classes=6, seed=0, sharpness=3.0) -> onnx.ModelProto:
    """Conv-Relu-MaxPool-Conv-Tanh-AveragePool-Gemm with seeded weights: a graph incremental
    occlusion can split, with a feature map for Score-CAM; its logits scaled by ``sharpness`` so that
    probabilities move with the image (maps far above float32 rounding)."""
    rng = np.random.default_rng(seed)
    init = lambda name, *shape: numpy_helper.from_array(  # noqa: E731
        (rng.standard_normal(shape) * (2.0 / np.prod(shape[1:])) ** 0.5).astype(np.float32), name)
    nodes = [helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool1"),
             helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("Tanh", ["c2"], ["features"], name="tanh2"),
             helper.make_node("AveragePool", ["features"], ["g"], kernel_shape=[4, 4], strides=[4, 4], name="pool2"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], transB=1, name="fc")]
    inits = [init("w1", 8, 3, 3, 3), init("b1", 8), init("w2", 16, 8, 3, 3), init("b2", 16),
             init("wf", classes, 16 * (size[0] // 8) * (size[1] // 8)), init("bf", classes)]
    inits[4] = numpy_helper.from_array(numpy_helper.to_array(inits[4]) * np.float32(sharpness), "wf")
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                           ["N", 3, *size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def cnn_nets():
    model = _cnn()
    options = dict(preprocessing="imagenet", batch_size=8)
    return (explainer.load(model, engine="onnxruntime", **options),
            explainer.load(model, engine="openvino", **options))


@pytest.fixture(scope="module")
def lite0_openvino():
    return explainer.load(engine="openvino", batch_size=8)  # batch sizes measured in test_auto_...


def _relative(ours, truth) -> float:
    ours, truth = np.asarray(ours, np.float64), np.asarray(truth, np.float64)
    assert ours.shape == truth.shape
    scale = float(np.abs(truth).max())
    assert scale > 0, "the reference map is all zero: the comparison would prove nothing"
    return float(np.abs(ours - truth).max()) / scale


def test_engine_and_precision_say_what_runs(cnn_nets, lite0_openvino, default_net):
    ort_net, ov_net = cnn_nets
    assert (ort_net.engine, ort_net.precision) == ("onnxruntime", "f32")
    assert (ov_net.engine, ov_net.precision) == ("openvino", "f32")
    assert (default_net.engine, lite0_openvino.engine) == ("onnxruntime", "openvino")
    assert isinstance(lite0_openvino.ort, openvino_engine.OpenVinoEngine)
    assert lite0_openvino.ort.session([lite0_openvino.output.name]).get_providers()[0].startswith("OpenVINO-CPU-f32")


def test_probabilities_equal_onnxruntime(cnn_nets, lite0_openvino, default_net, chelsea, coffee):
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    for ort_net, ov_net, images in ((default_net, lite0_openvino, [chelsea, coffee, *noise]),
                                    (*cnn_nets, [chelsea, coffee, *noise[:, :32, :32]])):
        truth = ort_net.predict(images, batch_size=4)
        ours = ov_net.predict(images, batch_size=4)
        assert np.abs(ours - truth).max() <= PROBABILITY_TOLERANCE
        x = ort_net.to_model_input(ort_net.prepare(images)[0])
        logits = [net.ort.run_batched(x, [net.output.softmax_input or net.output.name], 4)[0]
                  for net in (ort_net, ov_net)]
        assert np.abs(logits[1] - logits[0]).max() <= 1e-4 * max(1.0, float(np.abs(logits[0]).max()))


# every forward-only method, with options that keep the default model's runs short; same seeds on both
# engines, so both draw the same masks, samples and superpixels
METHODS = {
    "occlusion-plain": lambda net, img, label, big: explainer.occlusion_sensitivity(
        net, img, label, incremental=False, verbose=False, **({"stride": 48} if big else {})),
    "occlusion-incremental": lambda net, img, label, big: explainer.occlusion_sensitivity(
        net, img, label, incremental=True, verbose=False, **({"stride": 48} if big else {})),
    # the linear surrogate: the default tree's map is a discontinuous function of the scores (a split
    # moves where two candidates' impurities tie to 1e-7); its inputs, the same samples' scores, are
    # what this map is made from too
    "lime": lambda net, img, label, big: explainer.image_lime(
        net, img, label, model="linear", num_samples=100 if big else 300, random_state=0, verbose=False),
    "rise": lambda net, img, label, big: explainer.rise(
        net, img, label, num_masks=96 if big else 400, random_state=0, verbose=False),
    "kernel_shap": lambda net, img, label, big: explainer.kernel_shap(
        net, img, label, num_samples=80 if big else 300, random_state=0, verbose=False),
    # a feature layer of 24 channels on the default model (its default has 1280: 1280 passes)
    "score_cam": lambda net, img, label, big: explainer.score_cam(
        net, img, label, feature_layer="/_blocks.2/Add" if big else "tanh2", verbose=False),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_forward_only_maps_equal_onnxruntime_on_a_small_cnn(cnn_nets, chelsea, method):
    ort_net, ov_net = cnn_nets
    image = chelsea[::9, ::9]
    label = int(np.argmax(ort_net.predict(image)))
    truth = METHODS[method](ort_net, image, [label, (label + 1) % 6], False)
    ours = METHODS[method](ov_net, image, [label, (label + 1) % 6], False)
    assert _relative(ours, truth) <= MAP_TOLERANCE


@pytest.mark.parametrize("method", sorted(METHODS))
def test_forward_only_maps_equal_onnxruntime_on_the_default_model(default_net, lite0_openvino, chelsea, method):
    truth = METHODS[method](default_net, chelsea, 285, True)
    ours = METHODS[method](lite0_openvino, chelsea, 285, True)
    assert _relative(ours, truth) <= MAP_TOLERANCE


def test_deletion_and_insertion_curves_equal_onnxruntime(default_net, lite0_openvino, cnn_nets, chelsea):
    saliency = np.add.outer(np.arange(chelsea.shape[0]), np.arange(chelsea.shape[1])).astype(np.float32)
    for ort_net, ov_net, image in ((default_net, lite0_openvino, chelsea), (*cnn_nets, chelsea[::9, ::9])):
        s = saliency[:image.shape[0], :image.shape[1]]
        label = int(np.argmax(ort_net.predict(image)))
        for curve in (evaluate.deletion, evaluate.insertion):
            truth = curve(ort_net, image, s, label, steps=16, verbose=False)
            ours = curve(ov_net, image, s, label, steps=16, verbose=False)
            assert np.abs(np.asarray(ours.scores) - np.asarray(truth.scores)).max() <= PROBABILITY_TOLERANCE
            assert abs(ours.auc - truth.auc) <= PROBABILITY_TOLERANCE


@pytest.mark.parametrize("precision, capability, refusal", [("bf16", "BF16", "bf16"), ("f16", "FP16", "cannot run f16")])
def test_half_precisions_are_close_where_the_cpu_has_them(cnn_nets, chelsea, precision, capability, refusal):
    """A loose sanity check only: bf16 keeps 8 bits of mantissa, f16 needs AMX-FP16 / AVX512-FP16
    (benchmarks/openvino.py measures the drift and the maps' agreement); where the CPU lacks the
    precision, the load names what it offers."""
    model = cnn_nets[0].source_model
    if capability not in openvino_engine.core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        with pytest.raises(DeviceError, match=refusal):
            explainer.load(model, engine="openvino", precision=precision, preprocessing="imagenet")
        return
    net = explainer.load(model, engine="openvino", precision=precision, preprocessing="imagenet", batch_size=8)
    assert (net.engine, net.precision) == ("openvino", precision)
    image = chelsea[::9, ::9]
    truth = cnn_nets[0].predict(image)
    assert np.abs(net.predict(image) - truth).max() <= 0.05
    label = int(np.argmax(truth))
    f32 = explainer.occlusion_sensitivity(cnn_nets[0], image, label, verbose=False)
    half = explainer.occlusion_sensitivity(net, image, label, verbose=False)
    assert np.corrcoef(f32.ravel(), half.ravel())[0, 1] >= 0.9


def test_auto_measures_once_and_remembers(monkeypatch):
    calls = []
    real = openvino_engine.OpenVinoEngine._throughput
    monkeypatch.setattr(openvino_engine.OpenVinoEngine, "_throughput",
                        lambda self, *a: calls.append(a) or real(self, *a))
    model = _cnn(seed=3)  # a model of its own: nothing remembered for it yet
    first = explainer.load(model, engine="auto", preprocessing="imagenet")
    assert first.engine in ("onnxruntime", "openvino") and first.precision == "f32"
    assert calls, "engine='auto' measured nothing"
    calls.clear()
    second = explainer.load(model, engine="auto", preprocessing="imagenet")
    assert second.engine == first.engine and not calls
    image = np.full((32, 32, 3), 100, np.uint8)
    truth = explainer.load(model, preprocessing="imagenet").predict(image)
    assert np.abs(second.predict(image) - truth).max() <= PROBABILITY_TOLERANCE


def test_invalid_choices_are_refused():
    model = _cnn()
    with pytest.raises(InvalidParameterError, match="engine must be one of"):
        explainer.load(model, engine="tensorrt")
    with pytest.raises(InvalidParameterError, match="precision must be one of"):
        explainer.load(model, engine="openvino", precision="int4")
    with pytest.raises(InvalidParameterError, match="OpenVINO only"):
        explainer.load(model, precision="bf16")


def test_without_the_package_the_error_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    openvino_engine.core.cache_clear()
    try:
        with pytest.raises(DeviceError, match=r"pip install -e '\.\[openvino\]'"):
            explainer.load(_cnn(), engine="openvino", preprocessing="imagenet")
        assert explainer.load(_cnn(seed=5), engine="auto", preprocessing="imagenet").engine == "onnxruntime"
    finally:
        openvino_engine.core.cache_clear()
