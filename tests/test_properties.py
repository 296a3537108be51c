"""Property-based checks (hypothesis) over image sizes, dtypes and options, and non-finite outputs."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import explainer
from explainer.errors import DegenerateMapError, NonFiniteOutputError

import references
from graphs import linear_classifier, linear_classifier_gradient, weights

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


_MODEL, TWIN = linear_classifier(k=3, size=(16, 16))  # the graph and its numpy twin


@pytest.fixture(scope="module")
def tiny():
    return explainer.load(_MODEL, preprocessing="none", batch_size=8)


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


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _hand_occlusion(ref, small, labels, mask, stride, clipping):
    """The grid of probability drops by hand with the graph's numpy twin: mask centres on every stride
    multiple from the first pixel, clipped at the borders (MATLAB's MaskClipping 'on'), or masks
    wholly inside the image ('off'); the image's mean colour."""
    x = small.astype(np.float64)
    fill = x.reshape(-1, 3).mean(axis=0)
    size = x.shape[0]

    def windows():
        if clipping:
            return [(max(0, c - mask // 2), c - mask // 2 + mask) for c in range(0, size, stride)]
        return [(t, t + mask) for t in range(0, size - mask + 1, stride)]

    base = _softmax(ref(x.transpose(2, 0, 1)[None]))[0, labels]
    grid = np.zeros((len(labels), len(windows()), len(windows())))
    for i, (r0, r1) in enumerate(windows()):
        for j, (c0, c1) in enumerate(windows()):
            occluded = x.copy()
            occluded[r0:max(r0, r1), c0:max(c0, c1)] = fill
            grid[:, i, j] = base - _softmax(ref(occluded.transpose(2, 0, 1)[None]))[0, labels]
    return grid


@SETTINGS
@given(images, st.integers(1, 16), st.integers(1, 8), st.booleans(),
       st.sampled_from(["bicubic", "nearest", "coverage"]))
def test_occlusion_maps_finite_float32_of_image_size(tiny, spec, mask, stride, clipping, upsampling):
    image = _make(*spec)
    m = explainer.occlusion_sensitivity(tiny, image, [0, 2], mask_size=mask, stride=stride, mask_clipping=clipping,
                                        output_upsampling=upsampling, verbose=False)
    assert m.shape == (2, spec[0], spec[1]) and m.dtype == np.float32 and np.isfinite(m).all()
    # the grid itself, against the drops computed by hand on the network-size image
    grid = explainer.occlusion_sensitivity(tiny, image, [0, 2], mask_size=mask, stride=stride, mask_clipping=clipping,
                                           output_upsampling="none", verbose=False)
    expected = _hand_occlusion(TWIN, tiny.prepare(image)[0][0], [0, 2], mask, stride, clipping)
    np.testing.assert_allclose(grid, expected, rtol=1e-4, atol=1e-6)


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
        # by hand: the weights are the mean gradients (1 / HW for channel 0, 0 for the others), so the
        # CAM is relu(w_0 . x + b_0) / HW, resized with the documented bicubic filter, clipped at 0
        w, b = weights(3, 3)
        small = tiny.prepare(image)[0][0].astype(np.float64)
        cam = np.maximum(small @ w[0].astype(np.float64) + b[0], 0) / small[:, :, 0].size
        expected = np.maximum(references.bicubic_upsample(cam, spec[:2]), 0)
        # float32 rounds w . x + b at 6e-8 of its terms: where they cancel, of the terms, not the map
        terms = (small @ np.abs(w[0]).astype(np.float64) + abs(float(b[0]))).max() / small[:, :, 0].size
        np.testing.assert_allclose(m, expected, rtol=0, atol=1e-5 * expected.max() + 1e-6 * terms)


@SETTINGS
@given(st.sampled_from([1, 3, 4]), st.sampled_from(["uint8", "uint16", "float32", "float64", "bool"]),
       st.integers(0, 2 ** 16))
def test_gradient_at_the_network_size_is_the_hand_computed_one(tiny, channels, dtype, seed):
    """At the network's size (no resize between the pixels and the graph): d score / d pixel of the
    tiny graph by hand, w[0] / HW where relu1's unit is positive, with its sign; a gray image's one
    channel feeds all three; the public map is the sum over channels of |gradient| rescaled."""
    from explainer.io import to_pixel_batch
    from explainer.methods.gradients import pixel_attributions

    image = _make(16, 16, channels, dtype, seed)
    canonical = to_pixel_batch(image)[0][0]
    x = tiny.prepare(image)[0].transpose(0, 3, 1, 2)
    expected = linear_classifier_gradient(x, 0, k=3)[0]
    if canonical.shape[2] == 1:
        expected = expected.sum(axis=0, keepdims=True)
    np.testing.assert_allclose(pixel_attributions(tiny, image, 0)[0], expected, rtol=1e-5, atol=1e-9)
    total = np.abs(expected).sum(axis=0)
    public = explainer.gradient_attribution(tiny, image, 0)
    if total.max() > total.min():
        np.testing.assert_allclose(public, (total - total.min()) / (total.max() - total.min()), atol=1e-6)
    else:
        assert not public.any()


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
