"""LIME's stop rule on a tiny graph: sampling stops once the top-k features are the same in the bootstrap
refits, with the top-k a full run finds; it does not stop where the ranking is a tie; the progress bar
says why it stopped, and nothing is printed with verbose=False."""
import numpy as np
import pytest

import explainer
from explainer.methods.lime import STOP_RESAMPLES

from graphs import linear_classifier

# 16 grid cells of 4 x 4 pixels; cells that show the mask value (0) cannot matter
KW = dict(segmentation="grid", num_features=16, mask_value=0, stop_top_k=2, num_samples=1000, random_state=0,
          verbose=False)
LABEL = 2  # the class whose logit grows with the brightness of the pixels (its weights sum > 0)


@pytest.fixture(scope="module")
def tiny():
    model, _ = linear_classifier(k=3, size=(16, 16))
    return explainer.load(model, preprocessing="none")


def _two_regions():
    """Black but for cell 0 (white) and cell 9 (grey): the class probability depends on them alone,
    on cell 0 more."""
    image = np.zeros((16, 16, 3), np.uint8)
    image[0:4, 0:4] = 255
    image[8:12, 4:8] = 120
    return image


def _flat():
    """One grey: every cell changes the probability alike, so any top-2 is a coin toss."""
    return np.full((16, 16, 3), 200, np.uint8)


@pytest.mark.parametrize("model", ["tree", "linear"])
def test_stops_at_the_first_check_with_the_full_runs_top_k_where_two_regions_decide(tiny, model):
    early = explainer.lime_explanation(tiny, _two_regions(), LABEL, model=model, **KW)
    full = explainer.lime_explanation(tiny, _two_regions(), LABEL, model=model, **{**KW, "stop_tolerance": None})
    assert len(early.samples) == 64 and len(full.samples) == 1000  # the first check: max(4 x 16, 64)
    assert early.stop_reason == f"stopped at 64/1000: top-2 stable in {STOP_RESAMPLES}/{STOP_RESAMPLES} resamples"
    np.testing.assert_array_equal(early.samples, full.samples[:64])  # the resamples leave the stream alone
    assert list(np.argsort(-early.weights[0])[:2]) == list(np.argsort(-full.weights[0])[:2]) == [0, 9]
    again = explainer.lime_explanation(tiny, _two_regions(), LABEL, model=model, **KW)
    np.testing.assert_array_equal(again.weights, early.weights)  # seeded: the same stop, the same map


@pytest.mark.parametrize("model", ["tree", "linear"])
def test_does_not_stop_where_the_ranking_is_a_tie(tiny, model):
    exp = explainer.lime_explanation(tiny, _flat(), LABEL, model=model, **{**KW, "num_samples": 400})
    assert len(exp.samples) == 400
    assert exp.stop_reason.startswith("drew all 400: top-2 not stable at the last check")


def test_a_tolerance_of_one_stops_at_the_first_check_and_none_never_checks(tiny):
    assert len(explainer.lime_explanation(tiny, _flat(), LABEL, **{**KW, "stop_tolerance": 1.0}).samples) == 64
    exp = explainer.lime_explanation(tiny, _two_regions(), LABEL, **{**KW, "stop_tolerance": None})
    assert len(exp.samples) == 1000 and exp.stop_reason == ""


def test_the_progress_bar_says_why_sampling_stopped_and_verbose_false_prints_nothing(tiny, capfd):
    explainer.image_lime(tiny, _two_regions(), LABEL, **KW)
    explainer.image_lime(tiny, _flat(), LABEL, **{**KW, "num_samples": 200})
    assert capfd.readouterr() == ("", "")
    explainer.image_lime(tiny, _two_regions(), LABEL, **{**KW, "verbose": True})
    assert "stopped at 64/1000: top-2 stable in 40/40 resamples" in capfd.readouterr().err
    explainer.image_lime(tiny, _flat(), LABEL, **{**KW, "num_samples": 200, "verbose": True})
    assert "drew all 200: top-2 not stable at the last check" in capfd.readouterr().err


def test_the_answer_does_not_depend_on_the_batch_size(default_net, chelsea):
    """Stop checks fall at fixed sample counts, not at batch boundaries: one seed, one answer."""
    kw = dict(segmentation="grid", num_features=16, num_samples=320, model="linear", random_state=0, verbose=False)
    runs = [explainer.lime_explanation(default_net, chelsea, 285, batch_size=b, **kw) for b in (4, 24)]
    assert len(runs[0].samples) == len(runs[1].samples) and runs[0].stop_reason == runs[1].stop_reason
    np.testing.assert_allclose(runs[0].weights, runs[1].weights, rtol=1e-4, atol=1e-7)
