"""Input and output discovery on tiny graphs, checked against numpy versions of the same graphs."""
import numpy as np
import pytest
from onnx import TensorProto, helper

import explainer
from explainer.errors import InvalidParameterError, UnsupportedModelError

from graphs import linear_classifier


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture
def image():
    return np.random.default_rng(3).integers(0, 256, (20, 30, 3), dtype=np.uint8)


def _model_input(net, image):
    pixels, _ = net.prepare(image)
    return pixels.transpose(0, 3, 1, 2)  # 'none' preprocessing: model input == pixels


def test_nchw_float_logits(image):
    model, ref = linear_classifier(k=4, size=(8, 8))
    net = explainer.load(model, preprocessing="none")
    assert (net.input.layout, net.input.size, net.input.channels) == ("NCHW", (8, 8), 3)
    assert net.output.is_probability is False
    expected = _softmax(ref(_model_input(net, image)))[0]
    np.testing.assert_allclose(net.predict(image), expected, rtol=1e-5)
    np.testing.assert_allclose(net.logits(image), ref(_model_input(net, image))[0], rtol=1e-5)


def test_nhwc_uint8_input_with_preprocessing_in_graph(image):
    model, ref = linear_classifier(k=3, layout="NHWC", dtype=TensorProto.UINT8, size=(6, 5))
    net = explainer.load(model)
    assert (net.input.layout, net.input.dtype, net.input.size) == ("NHWC", np.uint8, (6, 5))
    assert net.preprocessing.name == "none"  # uint8 graphs normalise themselves
    x = np.rint(_model_input(net, image)).clip(0, 255)
    np.testing.assert_allclose(net.predict(image), _softmax(ref(x))[0], rtol=1e-5)


def test_trailing_softmax_detected_and_logits_exposed(image):
    model, ref = linear_classifier(k=4, softmax=True)
    net = explainer.load(model, preprocessing="none")
    assert net.output.is_probability and net.output.softmax_input == "logits"
    x = _model_input(net, image)
    np.testing.assert_allclose(net.predict(image), ref(x)[0], rtol=1e-5)
    w_logits = linear_classifier(k=4)[1](x)[0]
    np.testing.assert_allclose(net.logits(image), w_logits, rtol=1e-5)


def test_probabilities_without_softmax_node_detected_from_rows(image):
    model, ref = linear_classifier(k=4, normalise_div=True)
    net = explainer.load(model, preprocessing="none")
    assert net.output.is_probability is True and net.output.softmax_input is None
    np.testing.assert_allclose(net.predict(image), ref(_model_input(net, image))[0], rtol=1e-5)


def test_nk11_output(image):
    model, ref = linear_classifier(k=4, spatial_output=True)
    net = explainer.load(model, preprocessing="none")
    assert net.num_classes == 4
    np.testing.assert_allclose(net.predict(image), _softmax(ref(_model_input(net, image)).reshape(1, 4))[0],
                               rtol=1e-5)


def test_grayscale_model_gets_gray_pixels(image):
    model, ref = linear_classifier(k=2, c=1)
    net = explainer.load(model, preprocessing="none")
    assert net.input.channels == 1
    gray = (image.astype(np.float64) @ [0.299, 0.587, 0.114])
    x = _model_input(net, gray.astype(np.float32) / 255.0)
    np.testing.assert_allclose(net.predict(image), _softmax(ref(x))[0], rtol=1e-4)


def test_dynamic_size_defaults_to_224_and_layout_override():
    model, _ = linear_classifier()
    for d in model.graph.input[0].type.tensor_type.shape.dim[2:]:
        d.Clear()
        d.dim_param = "S"
    net = explainer.load(model, preprocessing="none")
    assert net.input.size == (224, 224)
    with pytest.raises(InvalidParameterError, match="input_layout"):
        explainer.load(model, input_layout="CHW")


def test_initializers_listed_as_inputs_are_skipped(googlenet_graph):
    assert googlenet_graph.input.name == "data_0"


def test_not_an_image_classifier():
    vec = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [vec], [out]),
                              opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UnsupportedModelError, match="no graph input looks like an image"):
        explainer.load(model)


def test_extra_inputs_refused():
    model, _ = linear_classifier()
    model.graph.input.append(helper.make_tensor_value_info("temperature", TensorProto.FLOAT, [1]))
    model.graph.node.append(helper.make_node("Identity", ["temperature"], ["t_out"]))
    model.graph.output.append(helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [1]))
    with pytest.raises(UnsupportedModelError, match="temperature"):
        explainer.load(model)


def test_segmentation_output_refused():
    model, _ = linear_classifier()
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("relu", TensorProto.FLOAT, ["N", 4, 8, 8]))
    with pytest.raises(UnsupportedModelError, match="segmentation"):
        explainer.load(model)
