"""Property-based checks (hypothesis) over image sizes, dtypes and options, and non-finite outputs."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import explainer
from explainer.errors import DegenerateMapError, NonFiniteOutputError

from graphs import linear_classifier

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tiny():
    model, _ = linear_classifier(k=3, size=(16, 16))
    return explainer.load(model, preprocessing="none", batch_size=8)


images = st.tuples(st.integers(1, 40), st.integers(1, 40), st.sampled_from([1, 3, 4]),
                   st.sampled_from(["uint8", "uint16", "float32", "float64", "bool"]), st.integers(0, 2 ** 16))


def _make(h, w, c, dtype, seed):
    rng = np.random.default_rng(seed)
    if dtype == "uint8":
        return rng.integers(0, 256, (h, w, c), dtype=np.uint8)
    if dtype == "uint16":
        return rng.integers(0, 65536, (h, w, c), dtype=np.uint16)
    if dtype == "bool":
        return rng.random((h, w, c)) > 0.5
    return rng.random((h, w, c)).astype(dtype)


@SETTINGS
@given(images, st.integers(1, 16), st.integers(1, 8), st.booleans(), st.sampled_from(["bicubic", "nearest", "coverage"]))
def test_occlusion_maps_finite_float32_of_image_size(tiny, spec, mask, stride, clipping, upsampling):
    image = _make(*spec)
    m = explainer.occlusion_sensitivity(tiny, image, [0, 2], mask_size=mask, stride=stride, mask_clipping=clipping,
                                        output_upsampling=upsampling, verbose=False)
    assert m.shape == (2, spec[0], spec[1]) and m.dtype == np.float32 and np.isfinite(m).all()


@SETTINGS
@given(images, st.integers(2, 12), st.integers(2, 40), st.sampled_from(["tree", "linear"]), st.integers(0, 1000))
def test_lime_maps_finite_and_seeded(tiny, spec, features, samples, model, seed):
    image = _make(*spec)
    kw = dict(num_features=features, num_samples=samples, segmentation="grid", model=model, random_state=seed,
              verbose=False)
    a = explainer.image_lime(tiny, image, 1, **kw)
    assert a.shape == spec[:2] and a.dtype == np.float32 and np.isfinite(a).all()
    np.testing.assert_array_equal(a, explainer.image_lime(tiny, image, 1, **kw))


@SETTINGS
@given(images)
def test_gradient_maps_finite_float32_of_image_size(tiny, spec):
    image = _make(*spec)
    m = explainer.gradient_attribution(tiny, image, 0)
    assert m.shape == spec[:2] and m.dtype == np.float32 and np.isfinite(m).all()
    try:
        m = explainer.gradcam(tiny, image, 0)
    except DegenerateMapError:
        # only where there is nothing to show: class k's score is the mean of relu1's channel k, so
        # Grad-CAM's map at relu1 is relu(A_k) / HW: zero exactly where onnxruntime's channel 0 is zero
        assert tiny.activations(image, "relu1")[0].max() == 0.0
    else:
        assert m.shape == spec[:2] and m.dtype == np.float32 and np.isfinite(m).all() and m.max() > 0


def _constant_model():
    """Scores that ignore the image: Mul(image, 0) feeds the graph so it still has an image input."""
    model, _ = linear_classifier(k=3, size=(16, 16))
    g = model.graph
    g.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), "zero"))
    g.node.insert(0, helper.make_node("Mul", ["image", "zero"], ["image_zeroed"]))
    for node in g.node[1:]:
        for k, name in enumerate(node.input):
            if name == "image":
                node.input[k] = "image_zeroed"
    return model


@SETTINGS
@given(images, st.integers(1, 16), st.integers(1, 8))
def test_occlusion_of_constant_model_is_zero(spec, mask, stride):
    net = explainer.load(_constant_model(), preprocessing="none")
    m = explainer.occlusion_sensitivity(net, _make(*spec), 0, mask_size=mask, stride=stride, verbose=False)
    assert np.all(m == 0)


def test_nan_scores_are_an_error_never_a_map():
    model, _ = linear_classifier(k=3, size=(16, 16))
    g = model.graph
    g.initializer.append(numpy_helper.from_array(np.full((), -1.0, np.float32), "minus_one"))
    out = g.output[0].name
    g.node.extend([helper.make_node("Mul", [out, "minus_one"], ["neg"]), helper.make_node("Sqrt", ["neg"], ["bad"])])
    g.node.extend([helper.make_node("Add", ["bad", out], ["scores"])])
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 3]))
    image = np.full((16, 16, 3), 200, np.uint8)
    net = explainer.load(model, preprocessing="none")
    with pytest.raises(NonFiniteOutputError, match="NaN"):
        net.predict(image)
    with pytest.raises(NonFiniteOutputError):
        explainer.occlusion_sensitivity(net, image, 0, verbose=False)
    with pytest.raises(NonFiniteOutputError):
        explainer.image_lime(net, image, 0, num_samples=8, verbose=False)
