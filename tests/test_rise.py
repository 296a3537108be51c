"""RISE: the paper's masks (eclique/RISE's skimage upsampling) and formula, computed here independently on
the same masks; seeds reproduce; labels share the passes; a toy graph whose score reads one region gets
that region ranked highest; memory does not grow with the number of masks."""
import tracemalloc

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import explainer
from explainer.errors import InvalidParameterError, InvalidParameterTypeError
from explainer.methods.rise import rise, rise_masks


@pytest.fixture(scope="module")
def image224(chelsea):
    from explainer.model.preprocess import resize

    return np.rint(resize(chelsea.astype(np.float32), (224, 224))).astype(np.uint8)


def region_net(size=32, region=(slice(0, 16), slice(16, 32))):
    """Two classes; logit 0 = 0.03 x (mean of the region's pixels, all channels) - 3, logit 1 = 0."""
    weight = np.zeros((3, size, size), np.float32)
    weight[:, region[0], region[1]] = 1.0
    weight = 0.03 * weight / weight.sum()
    w = np.stack([weight.ravel(), np.zeros(weight.size, np.float32)], axis=1)
    nodes = [helper.make_node("Flatten", ["image"], ["flat"]),
             helper.make_node("Gemm", ["flat", "W", "B"], ["logits"])]
    graph = helper.make_graph(nodes, "region", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                               ["N", 3, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
                              initializer=[numpy_helper.from_array(w, "W"),
                                           numpy_helper.from_array(np.array([-3.0, 0.0], np.float32), "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return explainer.load(model, preprocessing="none")


def test_masks_are_the_papers():
    """eclique/RISE generate_masks: resize(grid, (s+1) * cell, order=1, mode='reflect'), then a crop."""
    from skimage.transform import resize

    net = region_net(size=30)  # 30 / 4 is not whole: cell 8, upsampled to 40, cropped to 30
    masks = rise_masks(net, 20, 4, 0.3, random_state=0)
    full = masks.masks()
    assert full.shape == (20, 30, 30) and full.dtype == np.float32
    for i in range(20):
        dy, dx = masks.shifts[i]
        grid = masks.grids[i].astype(np.float32)
        ref = resize(grid, (40, 40), order=1, mode="reflect", anti_aliasing=False)[dy:dy + 30, dx:dx + 30]
        np.testing.assert_allclose(full[i], ref, atol=1e-6)
    assert masks.grids.dtype == bool and masks.shifts.min() >= 0 and masks.shifts.max() < 8
    np.testing.assert_array_equal(masks.masks(5, 9), full[5:9])


def test_equals_the_papers_formula(default_net, image224):
    """sum_i P(masked_i) M_i / (N p) with masked images blended in pixels here and probabilities from
    onnxruntime on the graph as loaded (not the library's normalised copy)."""
    import onnxruntime as ort

    net, n, p = default_net, 48, 0.4
    ours = rise(net, image224, 285, num_masks=n, keep_probability=p, random_state=3, estimator="paper",
                verbose=False)
    masks = rise_masks(net, n, 7, p, random_state=3).masks()[..., None]
    pixels = image224.astype(np.float32)
    fill = pixels.reshape(-1, 3).mean(axis=0)
    masked = masks * pixels + (1 - masks) * fill
    pre = net.preprocessing
    x = ((masked - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)).transpose(0, 3, 1, 2)
    session = ort.InferenceSession(net.source_model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = session.run(None, {net.input.name: np.ascontiguousarray(x, np.float32)})[0].astype(np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    expected = np.tensordot(probs[:, 285], masks[..., 0], axes=1) / (n * p)
    assert ours.shape == (224, 224) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, rtol=1e-5)
    # the centred estimator: sum_i (P_i - mean P) M_i / (N p) + mean P (the same expectation)
    centred = rise(net, image224, 285, num_masks=n, keep_probability=p, random_state=3, estimator="centred",
                   verbose=False)
    mean = probs[:, 285].mean()
    expected = np.tensordot(probs[:, 285] - mean, masks[..., 0], axes=1) / (n * p) + mean
    np.testing.assert_allclose(centred, expected, rtol=1e-4, atol=1e-6)


def test_seeds_and_labels(default_net, chelsea):
    net, kw = default_net, dict(num_masks=16, random_state=7, verbose=False)
    one = rise(net, chelsea, 285, **kw)
    assert one.shape == chelsea.shape[:2]
    np.testing.assert_array_equal(one, rise(net, chelsea, 285, **kw))
    assert not np.allclose(one, rise(net, chelsea, 285, **{**kw, "random_state": 8}))
    both = rise(net, chelsea, [285, 282], **kw)
    assert both.shape == (2, *chelsea.shape[:2])
    np.testing.assert_allclose(both[0], one, rtol=1e-6)
    np.testing.assert_allclose(both[1], rise(net, chelsea, 282, **kw), rtol=1e-6)
    batch = rise(net, np.stack([chelsea, chelsea[:, ::-1]]), 285, **kw)
    assert batch.shape == (2, *chelsea.shape[:2])
    np.testing.assert_allclose(batch[0], one, rtol=1e-6)


def test_region_ranked_highest():
    """Only the top-right quadrant moves the score: RISE must put its highest values there."""
    net = region_net()
    image = np.full((32, 32, 3), 200, np.uint8)
    sal = rise(net, image, 0, num_masks=1000, grid_size=4, mask_value=0, batch_size=250, random_state=0,
               verbose=False)
    inside, far = sal[:16, 16:], sal[16:, :16]
    assert inside.mean() > far.mean() + 0.05
    top = np.argsort(-sal.ravel())[:256]
    assert np.mean((top // 32 < 16) & (top % 32 >= 16)) > 0.8
    # keeping everything (p = 1) leaves the image as it is: the map is its probability everywhere
    full = rise(net, image, 0, num_masks=3, keep_probability=1.0, mask_value=0, verbose=False)
    np.testing.assert_allclose(full, net.predict(image)[0], rtol=1e-5)


def test_memory_does_not_grow_with_masks():
    """Masks are made per batch: 3200 more masks (52 MB if held at once) take hardly more memory."""
    net = region_net(size=64)
    image = np.full((64, 64, 3), 200, np.uint8)
    peaks = []
    for n in (800, 4000):
        tracemalloc.start()
        rise(net, image, 0, num_masks=n, batch_size=50, random_state=0, verbose=False)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] - peaks[0] < 8e6, peaks


def test_options_are_validated(default_net, chelsea):
    for bad in (dict(num_masks=0), dict(keep_probability=0.0), dict(grid_size=1.5), dict(mask_value=300)):
        with pytest.raises((InvalidParameterError, InvalidParameterTypeError)):
            rise(default_net, chelsea, 285, verbose=False, **bad)


# --- estimator="regression": the same expectation, estimated by regression on the masks ---------------------

def test_antithetic_masks_are_pairs_of_the_papers_masks():
    """Mask 2i is a paper mask (grid i, shift i), mask 2i + 1 its complement; any span gives the same."""
    net = region_net(size=30)
    pairs = rise_masks(net, 9, 4, 0.5, random_state=0, estimator="regression")
    full = pairs.masks()
    assert full.shape == (9, 30, 30) and len(pairs.grids) == 5
    plain = rise_masks(net, 5, 4, 0.5).masks  # the paper's masks of the same grids and shifts:
    plain.__self__.grids, plain.__self__.shifts = pairs.grids, pairs.shifts
    np.testing.assert_allclose(full[0::2], plain(), atol=1e-6)
    np.testing.assert_allclose(full[1::2], 1 - plain()[:4], atol=1e-6)
    np.testing.assert_array_equal(pairs.masks(3, 8), full[3:8])
    # no pairs where the complement is not a RISE mask (keep_probability != 0.5)
    assert not rise_masks(net, 8, 4, 0.3, estimator="regression").antithetic


def test_mask_covariance_is_exact():
    """p (1 - p) Kr (x) Kc against the empirical covariance of 60,000 masks (statistical tolerance)."""
    from explainer.methods.rise import RiseMasks

    masks = RiseMasks((10, 14), 60_000, 3, 0.3, random_state=1)
    m = masks.masks().reshape(60_000, -1).astype(np.float64)
    empirical = np.cov(m, rowvar=False)
    kr, kc = masks.covariance_factors()
    exact = 0.3 * 0.7 * np.kron(kr, kc)
    assert np.abs(empirical - exact).max() < 0.03 * exact.max()  # sampling error: about 0.6 % per entry
    assert np.corrcoef(empirical.ravel(), exact.ravel())[0, 1] > 0.999


def _score(m):
    """A nonlinear score of a mask: a sigmoid of two weighted regions and their interaction."""
    h, w = m.shape[1:]
    a, b = m[:, : h // 2, : w // 2].mean(axis=(1, 2)), m[:, h // 3:, w // 2:].mean(axis=(1, 2))
    return 1 / (1 + np.exp(-(3 * a + 2 * b + 4 * a * b - 4.5)))


def test_regression_estimates_the_rise_expectation_with_less_noise():
    """On a synthetic score of the mask, the regression map estimates the same expectation as the paper's
    sum, E[P | pixel kept]: close to a 400,000-mask Monte Carlo map (truth), and closer with 400 masks
    than the centred Monte Carlo sum on 400 masks, seed after seed (on average by more than half)."""
    from explainer.methods.rise import MaskRegression, RiseMasks

    size, p = (28, 28), 0.5

    def monte_carlo(n, seed):
        masks = RiseMasks(size, n, 7, p, random_state=seed)
        total, mean_m, mean_y = 0, 0, 0
        for start in range(0, n, 20_000):
            m = masks.masks(start, min(n, start + 20_000)).astype(np.float64)
            y = _score(m)
            total, mean_m, mean_y = total + np.tensordot(y, m, 1), mean_m + m.sum(0), mean_y + y.sum()
        mean_m, mean_y = mean_m / n, mean_y / n
        return mean_y + (total / n - mean_y * mean_m) / p

    def regression(n, seed):
        masks = RiseMasks(size, n, 7, p, random_state=seed, antithetic=True)
        estimate = MaskRegression(masks, 1)
        for start in range(0, n, 100):
            m = masks.masks(start, min(n, start + 100))
            estimate.add(m, _score(m)[:, None])
        return estimate.maps()[0]

    truth = monte_carlo(400_000, 0)
    error = lambda m: np.sqrt(((m - truth) ** 2).mean()) / truth.std()
    assert np.corrcoef(regression(4_000, 1).ravel(), truth.ravel())[0, 1] > 0.99
    errors = np.array([(error(regression(400, seed)), error(monte_carlo(400, seed))) for seed in range(2, 6)])
    assert (errors[:, 0] < errors[:, 1]).all() and errors[:, 0].mean() < 0.5 * errors[:, 1].mean(), errors


def test_regression_on_a_model(default_net, chelsea):
    """On the embedded model: 300 regression passes agree better with a 2,000-mask centred map than 300
    centred passes do; units are the paper's (mean probability of the masked images keeping the pixel)."""
    label = 285
    reference = rise(default_net, chelsea, label, num_masks=2000, random_state=0, verbose=False)
    corr = lambda a: np.corrcoef(a.ravel(), reference.ravel())[0, 1]
    fast = rise(default_net, chelsea, label, num_masks=300, estimator="regression", random_state=1, verbose=False)
    plain = rise(default_net, chelsea, label, num_masks=300, random_state=1, verbose=False)
    assert fast.shape == reference.shape and fast.dtype == np.float32
    assert corr(fast) > corr(plain) and corr(fast) > 0.85, (corr(fast), corr(plain))
    assert abs(fast.mean() - reference.mean()) < 0.05 * reference.mean()


# --- stop_reliability: the regression's noise estimate, and the stop it drives -------------------------------

def _regression_runs(n, seeds, antithetic, noise, size=(28, 28)):
    """(map, estimated reliability) of MaskRegression on ``_score`` plus Gaussian noise, one per seed."""
    from explainer.methods.rise import MaskRegression, RiseMasks

    out = []
    for seed in seeds:
        masks = RiseMasks(size, n, 7, 0.5 if antithetic else 0.3, random_state=seed, antithetic=antithetic)
        estimate, rng = MaskRegression(masks, 1), np.random.default_rng(seed + 1000)
        for start in range(0, n, 50):  # batches of 50, then 49 / 51: pairs split across batches
            m = masks.masks(start, min(n, start + 50))
            estimate.add(m, (_score(m) + noise * rng.standard_normal(len(m)))[:, None])
        out.append((estimate.maps()[0], estimate.reliability()[0]))
    return out


@pytest.mark.parametrize("antithetic", [True, False])
def test_reliability_predicts_the_agreement_of_two_runs(antithetic):
    """The estimated reliability (from one run's own residuals, no second run) against the measured
    correlation of independent runs of as many masks (10 runs, 5 pairs): within 0.03 on average."""
    runs = _regression_runs(300, range(10), antithetic, noise=0.05)
    predicted = np.mean([r for _, r in runs])
    measured = np.mean([np.corrcoef(runs[i][0].ravel(), runs[i + 1][0].ravel())[0, 1] for i in range(0, 10, 2)])
    assert 0.8 < measured < 0.99 and abs(predicted - measured) < 0.03, (predicted, measured)


def test_reliability_pairs_split_across_batches():
    """The pairs' statistics do not depend on where batches end (odd batch sizes leave a mask waiting)."""
    from explainer.methods.rise import MaskRegression, RiseMasks

    masks = RiseMasks((28, 28), 200, 7, 0.5, random_state=3, antithetic=True)
    y = _score(masks.masks())[:, None]
    whole, split = MaskRegression(masks, 1), MaskRegression(masks, 1)
    whole.add(masks.masks(), y)
    for start, stop in ((0, 7), (7, 100), (100, 101), (101, 200)):
        split.add(masks.masks(start, stop), y[start:stop])
    assert whole.pairs == split.pairs == 100
    np.testing.assert_allclose(split.dd, whole.dd, rtol=1e-12)
    np.testing.assert_allclose(split.reliability(), whole.reliability(), rtol=1e-9)


def test_stop_reliability():
    """The run stops at the first check whose reliability reaches the target (fewer passes for a lower
    target), reproducibly, and its map is that of the masks drawn so far: the regression over a prefix
    of the full run's masks, computed here from the model's probabilities."""
    from explainer.methods.rise import STOP_FIRST, MaskRegression, Rise

    net = region_net()
    image = np.full((32, 32, 3), 200, np.uint8)
    options = dict(num_masks=3000, grid_size=4, keep_probability=0.5, mask_value=0, estimator="regression",
                   batch_size=50, backend="onnxruntime", random_state=0, verbose=False)
    low, high = Rise(net, **options, stop_reliability=0.998), Rise(net, **options, stop_reliability=0.9997)
    low_map, high_map = low(image, 0), high(image, 0)
    assert STOP_FIRST <= low.passes[0] < high.passes[0] < 3000, (low.passes, high.passes)
    again = Rise(net, **options, stop_reliability=0.998)
    np.testing.assert_array_equal(again(image, 0), low_map)
    assert again.passes == low.passes
    n = low.passes[0]
    masks = rise_masks(net, 3000, 4, 0.5, random_state=0, estimator="regression")
    m = masks.masks(0, n)
    estimate = MaskRegression(masks, 1)
    estimate.add(m, net.predict(m[..., None] * image / 255.0)[:, :1])  # masked toward 0
    assert estimate.reliability()[0] >= 0.998
    np.testing.assert_allclose(low_map, estimate.maps()[0], rtol=1e-4, atol=1e-6)
    # no stop asked: every mask drawn
    full = Rise(net, **options, stop_reliability=None)
    full(image, 0)
    assert full.passes == [3000]


def test_stop_reliability_is_validated(default_net, chelsea):
    for bad in (dict(stop_reliability=0.0), dict(stop_reliability=1.5), dict(stop_reliability="yes"),
                dict(stop_reliability=0.9, estimator="centred"), dict(stop_reliability=0.9, estimator="paper")):
        with pytest.raises((InvalidParameterError, InvalidParameterTypeError)):
            rise(default_net, chelsea, 285, num_masks=8, verbose=False, **bad)
