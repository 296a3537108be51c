"""Occlusion sensitivity and LIME: equal to Captum's Occlusion and the lime package; both backends
agree; memory stays bounded; invalid options are named."""
import tracemalloc

import numpy as np
import pytest
import torch

import explainer
from explainer.errors import InvalidParameterError
from explainer.runtime.torch_engine import torch_engine

from graphs import linear_classifier


@pytest.fixture(scope="module")
def image224(chelsea):
    from explainer.model.preprocess import resize

    return np.rint(resize(chelsea.astype(np.float32), (224, 224))).astype(np.uint8)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_occlusion_equals_captum(default_net, image224, backend):
    from captum.attr import Occlusion

    model = torch_engine(default_net).pixel_model

    def probability(x):
        return torch.softmax(model(x), dim=1)

    x = torch.from_numpy(image224.astype(np.float32)).permute(2, 0, 1)[None]
    # (224 - 64) / 40 is whole, so Captum's windows all lie inside the image (Captum clips a last,
    # partial window otherwise, where MATLAB's MaskClipping 'off' drops it)
    ref = Occlusion(probability).attribute(x, sliding_window_shapes=(3, 64, 64), strides=(3, 40, 40),
                                           baselines=128.0, target=285, perturbations_per_eval=8)[0, 0]
    ours = explainer.occlusion_sensitivity(default_net, image224, 285, mask_size=64, stride=40,
                                           mask_value=128, mask_clipping=False,
                                           output_upsampling="coverage", backend=backend, verbose=False)
    np.testing.assert_allclose(ours, ref.numpy(), atol=1e-5 if backend == "torch" else 1e-4)


def test_occlusion_grid_hand_computed():
    """A tiny graph: each mask's drop recomputed by hand with the graph's numpy twin."""
    model, ref = linear_classifier(k=3, size=(8, 8))
    net = explainer.load(model, preprocessing="none")
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    grid = explainer.occlusion_sensitivity(net, image, [0, 2], mask_size=3, stride=2, mask_value=50,
                                           output_upsampling="none", verbose=False)
    x = image.astype(np.float64).transpose(2, 0, 1)[None]
    softmax = lambda z: np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)
    base = softmax(ref(x))[0]
    centres = range(0, 8, 2)
    assert grid.shape == (2, 4, 4)
    for i, r in enumerate(centres):
        for j, c in enumerate(centres):
            occluded = x.copy()
            occluded[:, :, max(0, r - 1):r + 2, max(0, c - 1):c + 2] = 50
            p = softmax(ref(occluded))[0]
            np.testing.assert_allclose(grid[:, i, j], base[[0, 2]] - p[[0, 2]], atol=1e-6)


def test_occlusion_auto_labels_and_shapes(default_net, chelsea):
    both = explainer.occlusion_sensitivity(default_net, chelsea, ["Egyptian cat", "tabby"], verbose=False)
    one = explainer.occlusion_sensitivity(default_net, chelsea, "Egyptian cat", verbose=False)
    assert both.shape == (2, 300, 451) and one.shape == (300, 451) and one.dtype == np.float32
    np.testing.assert_allclose(both[0], one, atol=1e-6)
    assert one.max() > 0.01  # occluding the cat's head lowers its probability


def test_lime_linear_weights_equal_lime_package(default_net, image224):
    from lime.lime_image import LimeImageExplainer

    exp = explainer.lime_explanation(default_net, image224, [285, 282], num_samples=300, model="linear",
                                     random_state=3, verbose=False, batch_size=16, stop_tolerance=None)
    small = image224.astype(np.float32)
    fill = small.reshape(-1, 3).mean(axis=0)

    def classifier(images):
        return default_net.predict_model_input(default_net.to_model_input(np.asarray(images, np.float32)), 16)

    ref = LimeImageExplainer(kernel_width=0.25, random_state=3).explain_instance(
        small, classifier, labels=(285, 282), top_labels=None, hide_color=fill, num_features=100000,
        num_samples=300, batch_size=16, segmentation_fn=lambda _: exp.segments, random_seed=0)
    for k, label in enumerate((285, 282)):
        theirs = np.zeros(exp.weights.shape[1])
        for feature, weight in ref.local_exp[label]:
            theirs[feature] = weight
        np.testing.assert_allclose(exp.weights[k], theirs, atol=1e-6)
        # the map paints each superpixel with the lime package's weight for it (the image is at the
        # network's size: no resize)
        np.testing.assert_allclose(exp.map[k], theirs[exp.segments], atol=1e-6)


def test_lime_seeded_reproducible_and_backends_agree(default_net, image224):
    kw = dict(num_samples=64, random_state=11, verbose=False, segmentation="grid", num_features=16)
    a = explainer.image_lime(default_net, image224, 285, **kw)
    b = explainer.image_lime(default_net, image224, 285, **kw)
    np.testing.assert_array_equal(a, b)
    t = explainer.image_lime(default_net, image224, 285, backend="torch", model="linear", **kw)
    o = explainer.image_lime(default_net, image224, 285, model="linear", **kw)
    np.testing.assert_allclose(t, o, atol=1e-4)
    c = explainer.image_lime(default_net, image224, 285, **{**kw, "random_state": 12})
    assert not np.array_equal(a, c)


def test_lime_stops_once_the_top_superpixels_are_settled(default_net, coffee):
    """On the espresso cup two grid cells matter most by far: sampling stops at an early check, on a
    prefix of the full run's samples, with the top-2 cells that full runs find with this seed and another."""
    from explainer.model.preprocess import resize

    image = np.rint(resize(coffee.astype(np.float32), (224, 224))).astype(np.uint8)
    kw = dict(segmentation="grid", num_features=16, stop_top_k=2, verbose=False)
    early = explainer.lime_explanation(default_net, image, 967, num_samples=512, random_state=0, **kw)
    assert len(early.samples) <= 128 and early.stop_reason.startswith(f"stopped at {len(early.samples)}/512")
    top = set(np.argsort(-early.weights[0])[:2])
    for seed in (0, 1):
        full = explainer.lime_explanation(default_net, image, 967, num_samples=256, random_state=seed,
                                          stop_tolerance=None, **kw)
        if seed == 0:
            np.testing.assert_array_equal(early.samples, full.samples[:len(early.samples)])  # same stream
        assert set(np.argsort(-full.weights[0])[:2]) == top


def test_lime_segmentations(default_net, image224):
    """Superpixels are scikit-image's SLIC with the documented parameters (n_segments = num_features,
    compactness 10, on pixels scaled to [0, 1]), labels renumbered 0..F-1; a grid cuts rows and columns
    evenly; a label matrix is resized to the network's size with nearest-neighbour sampling."""
    from skimage.segmentation import slic

    exp = explainer.lime_explanation(default_net, image224, 285, num_samples=32, verbose=False)
    theirs = slic(image224.astype(np.float32) / 255.0, n_segments=49, compactness=10, start_label=0, channel_axis=-1)
    theirs = np.unique(theirs, return_inverse=True)[1].reshape(theirs.shape)
    assert 20 <= theirs.max() + 1 <= 80
    np.testing.assert_array_equal(exp.segments, theirs)
    grid = explainer.lime_explanation(default_net, image224, 285, num_samples=32, segmentation="grid",
                                      num_features=9, verbose=False)
    rows, cols = np.meshgrid(np.arange(224), np.arange(224), indexing="ij")
    np.testing.assert_array_equal(grid.segments, (rows * 3 // 224) * 3 + cols * 3 // 224)  # 3 x 3 cells
    labels = np.zeros((10, 10), np.int64)
    labels[5:] = 7
    custom = explainer.lime_explanation(default_net, image224, 285, num_samples=32, segmentation=labels,
                                        verbose=False)
    assert custom.weights.shape == (1, 2)
    np.testing.assert_array_equal(custom.segments, (rows >= 112).astype(int))


def test_lime_tree_surrogate_equals_scikit_learn():
    """MATLAB's default surrogate, recomputed without the library on a tiny graph: the lime package's
    sampling (RandomState(seed).randint(0, 2), the first sample all on), each sample's probabilities
    from the graph's numpy twin, the lime kernel on the cosine distance, then scikit-learn's
    DecisionTreeRegressor (its defaults, the same random_state) fitted with those weights: its
    impurity-based feature importances are the weights, and the map paints them on their cells."""
    from sklearn.tree import DecisionTreeRegressor

    model, ref = linear_classifier(k=3, size=(16, 16))
    net = explainer.load(model, preprocessing="none", batch_size=8)
    image = np.random.default_rng(2).integers(0, 256, (16, 16, 3)).astype(np.uint8)
    n, seed = 160, 4
    exp = explainer.lime_explanation(net, image, [0, 2], num_features=16, num_samples=n, segmentation="grid",
                                     model="tree", output_upsampling="none", random_state=seed,
                                     stop_tolerance=None, verbose=False)
    rows, cols = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    segments = (rows // 4) * 4 + cols // 4
    np.testing.assert_array_equal(exp.segments, segments)
    samples = np.random.RandomState(seed).randint(0, 2, n * 16).reshape(n, 16)
    samples[0] = 1
    np.testing.assert_array_equal(exp.samples, samples)
    x = np.repeat(image.astype(np.float64)[None], n, axis=0)
    x[samples[:, segments] == 0] = image.reshape(-1, 3).mean(axis=0)  # switched off: the mean colour
    logits = ref(x.transpose(0, 3, 1, 2))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs = (probs / probs.sum(1, keepdims=True))[:, [0, 2]]
    np.testing.assert_allclose(exp.probabilities, probs, rtol=1e-5, atol=1e-7)
    cosine = 1 - samples.sum(1) / (np.sqrt(samples.sum(1)) * np.sqrt(16))
    kernel = np.sqrt(np.exp(-cosine ** 2 / 0.25 ** 2))
    np.testing.assert_allclose(exp.kernel_weights, kernel, rtol=1e-12)
    for k in range(2):
        # fitted on the arrays just checked, bit for bit: a tree's split between two equally good
        # features turns on the last bit of a weight
        tree = DecisionTreeRegressor(random_state=seed).fit(samples, exp.probabilities[:, k].astype(np.float64),
                                                           sample_weight=exp.kernel_weights)
        theirs = tree.feature_importances_
        assert theirs.max() > 0.1 and len(set(np.round(theirs, 6))) > 4  # a ranking worth comparing
        np.testing.assert_allclose(exp.weights[k], theirs, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(exp.map[k], theirs[segments], rtol=1e-5, atol=1e-7)
    public = explainer.image_lime(net, image, [0, 2], num_features=16, num_samples=n, segmentation="grid",
                                  output_upsampling="none", random_state=seed, stop_tolerance=None, verbose=False)
    np.testing.assert_array_equal(public, exp.map)


@pytest.mark.parametrize("call, match", [
    (lambda n, i: explainer.occlusion_sensitivity(n, i, 0, mask_size=300), "larger than"),
    (lambda n, i: explainer.occlusion_sensitivity(n, i, 0, stride=0), r"stride must be an integer in \[1"),
    (lambda n, i: explainer.occlusion_sensitivity(n, i, 0, output_upsampling="linear"), "'bicubic'"),
    (lambda n, i: explainer.image_lime(n, i, 0, num_samples=1), r"num_samples must be an integer in \[2"),
    (lambda n, i: explainer.image_lime(n, i, 0, segmentation="quickshift"), "'superpixels', 'grid'"),
    (lambda n, i: explainer.image_lime(n, i, 0, model="forest"), "'tree', 'linear'"),
    (lambda n, i: explainer.image_lime(n, i, 0, stop_tolerance=1.5), r"stop_tolerance must be a number in \[0.0, 1"),
    (lambda n, i: explainer.image_lime(n, i, 0, stop_top_k=0), r"stop_top_k must be an integer in \[1"),
    (lambda n, i: explainer.occlusion_sensitivity(n, i, 0, backend="tensorflow"), "'onnxruntime', 'torch'"),
])
def test_invalid_options(default_net, image224, call, match):
    with pytest.raises(InvalidParameterError, match=match):
        call(default_net, image224)


def test_progress_bar_and_silence(default_net, image224, capfd):
    explainer.occlusion_sensitivity(default_net, image224, 285, mask_size=100, stride=100, verbose=False)
    assert capfd.readouterr().err == ""
    explainer.occlusion_sensitivity(default_net, image224, 285, mask_size=100, stride=100, verbose=True)
    assert "occlusion" in capfd.readouterr().err


def test_memory_does_not_grow_with_samples():
    model, _ = linear_classifier(k=3, size=(128, 128))
    net = explainer.load(model, preprocessing="none", batch_size=8)
    image = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    peaks = []
    for n in (100, 1600):
        tracemalloc.start()
        explainer.image_lime(net, image, 0, num_samples=n, segmentation="grid", num_features=16,
                             verbose=False, random_state=0)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    # 1600 images would be 1600 x 128 x 128 x 3 x 4 bytes = 315 MB at once; batches keep it flat
    assert peaks[1] < peaks[0] * 1.5 + 2e6, peaks
