"""KernelSHAP: equal to Captum's KernelShap given the same samples; exact Shapley values recovered on a
tiny graph; Captum's sampling distribution; seeded, labels share samples, batches, options."""
import itertools
import math

import numpy as np
import pytest
import torch

import explainer
from explainer.errors import InvalidParameterError, InvalidParameterTypeError
from explainer.runtime.perturb import Canvas
from explainer.methods.kernel_shap import draw_samples, kernel_shap, kernel_shap_explanation

from graphs import linear_classifier


@pytest.fixture(scope="module")
def image224(chelsea):
    from explainer.model.preprocess import resize

    return np.rint(resize(chelsea.astype(np.float32), (224, 224))).astype(np.uint8)


@pytest.fixture(scope="module")
def tiny():
    """A 3-class graph on 8 x 8 images (softmax of additive logits: the features interact), its numpy
    twin, an image and four quadrant features."""
    model, reference = linear_classifier(k=3, size=(8, 8))
    net = explainer.load(model, preprocessing="none")
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    quadrants = np.repeat(np.repeat(np.arange(4).reshape(2, 2), 4, axis=0), 4, axis=1)
    return net, reference, image, quadrants


def test_equals_captum_kernel_shap_given_the_same_samples(default_net, image224):
    """Captum's KernelShap with its sampler replaced by a generator of our samples: same feature mask
    (our segments), same baseline (our fill, in model input), same forward passes (onnxruntime)."""
    from captum.attr import KernelShap

    labels = [285, 282]
    exp = kernel_shap_explanation(default_net, image224, labels, num_features=16, num_samples=48, random_state=3,
                                  batch_size=8, verbose=False)
    design = np.hstack([np.ones((len(exp.samples), 1)), exp.samples])
    assert np.linalg.matrix_rank(design) == design.shape[1]  # one least-squares solution, not a choice of them
    small = default_net.fit_pixels(image224)
    canvas = Canvas(default_net, small, small.reshape(-1, 3).mean(axis=0))  # mask_value="auto"
    nchw = default_net.input.layout == "NCHW"
    mask = torch.from_numpy(exp.segments[None, None] if nchw else exp.segments[None, :, :, None])

    def forward(x):
        return torch.from_numpy(default_net.predict_model_input(x.numpy(), 8))

    def our_samples(original_inp, **kwargs):
        for row in exp.samples:
            yield torch.from_numpy(row[None].astype(np.int64))

    for k, label in enumerate(labels):
        shap = KernelShap(forward)
        shap.perturb_func = our_samples  # everything else (kernel, regression, masking) is Captum's
        theirs = shap.attribute(torch.from_numpy(canvas.base), baselines=torch.from_numpy(canvas.fill), target=label,
                                feature_mask=mask, n_samples=len(exp.samples), perturbations_per_eval=8,
                                return_input_shape=False)
        theirs = theirs.numpy().ravel()
        np.testing.assert_allclose(exp.values[k], theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())
    # efficiency: the values sum to f(all on) - f(all off)
    np.testing.assert_allclose(exp.values.sum(axis=1), exp.probabilities[0] - exp.probabilities[1], atol=1e-5)


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_recovers_exact_shapley_values(tiny):
    """Shapley values by enumerating all 16 coalitions of the four quadrants with the graph's numpy
    twin; KernelSHAP's estimate converges to them."""
    net, reference, image, quadrants = tiny
    exp = kernel_shap_explanation(net, image, [0, 1, 2], segmentation=quadrants, mask_value=50,
                                  num_samples=6000, output_upsampling="none", random_state=0, verbose=False)
    np.testing.assert_array_equal(exp.segments, quadrants)
    x = image.astype(np.float64).transpose(2, 0, 1)[None]
    m = 4

    def value(coalition):
        masked = np.where(np.isin(quadrants, coalition)[None, None], x, 50.0)
        return _softmax(reference(masked))[0]

    exact = np.zeros((3, m))
    for i in range(m):
        others = [j for j in range(m) if j != i]
        for size in range(m):
            weight = math.factorial(size) * math.factorial(m - size - 1) / math.factorial(m)
            for s in itertools.combinations(others, size):
                exact[:, i] += weight * (value(list(s) + [i]) - value(list(s)))
    tolerance = 0.01 * np.abs(exact).max()
    alone = np.stack([value([i]) - value([]) for i in range(m)], axis=1)  # each quadrant's effect alone
    assert np.abs(alone - exact).max() > 5 * tolerance  # the features interact: a case worth testing
    np.testing.assert_allclose(exp.values, exact, atol=tolerance)
    np.testing.assert_allclose(exp.map, exp.values[:, quadrants], atol=1e-6)  # painted per feature


def test_samples_follow_captums_distribution():
    """Number on ~ (F - 1) / (k (F - k)) over 1..F-1 (Captum's Categorical), which ones uniform."""
    f, n = 6, 30000
    samples = draw_samples(f, n, 1)
    assert samples[0].all() and not samples[1].any() and samples.shape == (n, f)
    on = samples[2:].sum(axis=1)
    k = np.arange(1, f)
    expected = (f - 1) / (k * (f - k))
    np.testing.assert_allclose(np.bincount(on, minlength=f)[1:] / len(on), expected / expected.sum(), atol=0.01)
    np.testing.assert_allclose(samples[2:].mean(axis=0), on.mean() / f, atol=0.01)


def test_seeded_labels_share_samples_batches_and_backends(tiny):
    net, _, image, quadrants = tiny
    kw = dict(segmentation="grid", num_features=9, num_samples=200, random_state=5, verbose=False)
    a = kernel_shap(net, image, [0, 2], **kw)
    np.testing.assert_array_equal(a, kernel_shap(net, image, [0, 2], **kw))
    assert a.shape == (2, 8, 8) and a.dtype == np.float32
    assert not np.array_equal(a, kernel_shap(net, image, [0, 2], **{**kw, "random_state": 6}))
    for k, label in enumerate([0, 2]):
        np.testing.assert_allclose(a[k], kernel_shap(net, image, label, **kw), atol=1e-6)
    np.testing.assert_allclose(kernel_shap(net, image, [0, 2], backend="torch", **kw), a, atol=1e-6)
    other = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    batch = kernel_shap(net, np.stack([image, other]), [0, 2], **kw)
    assert batch.shape == (2, 2, 8, 8)
    np.testing.assert_allclose(batch[0], a, atol=1e-6)
    np.testing.assert_allclose(batch[1], kernel_shap(net, other, [0, 2], **kw), atol=1e-6)


def test_progress_bar_and_silence(tiny, capfd):
    net, _, image, _ = tiny
    kernel_shap(net, image, 0, segmentation="grid", num_features=4, num_samples=16, verbose=False)
    assert capfd.readouterr().err == ""
    kernel_shap(net, image, 0, segmentation="grid", num_features=4, num_samples=16, verbose=True)
    assert "KernelSHAP" in capfd.readouterr().err


@pytest.mark.parametrize("options, error, match", [
    (dict(num_samples=1), InvalidParameterError, r"num_samples must be an integer in \[2"),
    (dict(segmentation="quickshift"), InvalidParameterError, "'superpixels', 'grid'"),
    (dict(segmentation=np.zeros((4, 4))), InvalidParameterTypeError, "2-D integer label matrix"),
    (dict(segmentation=np.zeros((4, 4), np.int64)), InvalidParameterError, "single label"),
    (dict(mask_value=300), InvalidParameterError, "mask_value"),
    (dict(output_upsampling="linear"), InvalidParameterError, "'bicubic'"),
    (dict(num_sample=10), InvalidParameterTypeError, "did you mean num_samples"),
])
def test_invalid_options(tiny, options, error, match):
    net, _, image, _ = tiny
    with pytest.raises(error, match=match):
        kernel_shap(net, image, 0, **options)
    with pytest.raises(error, match=match):
        kernel_shap_explanation(net, image, 0, **options)
