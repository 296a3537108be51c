"""Progress (explainer/progress.py): every long loop reports through one kind of bar, heard by the
thread's observers whether it is shown or not, silent with verbose=False, saying why when it stops
early; an observer that raises stops the loop."""
import numpy as np
import pytest

import explainer
from explainer import progress
from explainer.report import explain

from graphs import linear_classifier


@pytest.fixture(scope="module")
def tiny():
    model, _ = linear_classifier(k=3, size=(16, 16))
    return explainer.load(model, preprocessing="none")


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)


def _heard(fn):
    steps = []
    with progress.observe(steps.append):
        fn()
    return steps


def _last(steps, desc):
    mine = [s for s in steps if s.desc == desc]
    assert mine, sorted({s.desc for s in steps})
    return mine[-1]


def test_bars_are_heard_when_silent_and_print_nothing(tiny, image, capfd):
    scores = tiny.gradient_scores
    steps = _heard(lambda: (
        explainer.deep_dream_image(tiny, scores, [0, 1], num_iterations=3, pyramid_levels=2, verbose=False),
        explainer.integrated_gradients(tiny, image, 0, steps=8, batch_size=4, verbose=False),
        explainer.smoothgrad(tiny, image, 0, samples=6, batch_size=3, verbose=False),
        explainer.occlusion_sensitivity(tiny, image, 0, mask_size=4, stride=4, batch_size=4, verbose=False)))
    assert capfd.readouterr() == ("", "")
    dream = _last(steps, "deep dream")
    assert dream.closed and dream.done == dream.total == 2 * 3
    assert _last(steps, "integrated gradients").done == 2  # 8 steps in batches of 4
    assert _last(steps, "smoothgrad").done == 2
    occl = _last(steps, "occlusion")
    assert occl.done == occl.total == 16  # 4 x 4 mask positions


def test_the_report_counts_its_phases(tiny, image, tmp_path, capfd):
    steps = _heard(lambda: explain(tiny, image, methods=["occlusion", "gradient"], labels="0,1",
                                   out_dir=tmp_path, verbose=False, options={"occlusion": {"mask_size": 8,
                                                                                          "stride": 8}}))
    phases = [s for s in steps if s.desc == "explain"]
    assert phases[-1].closed and phases[-1].done == phases[-1].total == 2 * (1 + 2)  # a map, then 2 curves each
    assert capfd.readouterr().err == ""


def test_an_early_stop_keeps_its_line_with_the_reason(capfd):
    with progress.bar(total=10, desc="sampling") as bar:
        bar.update(4)
        bar.stopped_early("stable after 4")
    err = capfd.readouterr().err
    assert err.rstrip().endswith("stable after 4]") and "4/10" in err.splitlines()[-1].split("\r")[-1]


class Stop(Exception):
    pass


def test_an_observer_that_raises_stops_the_loop(tiny, image):
    seen = []

    def stop_after_two(step):
        seen.append(step)
        if step.desc == "occlusion" and step.done >= 2:
            raise Stop

    with pytest.raises(Stop), progress.observe(stop_after_two):
        explainer.occlusion_sensitivity(tiny, image, 0, mask_size=2, stride=2, batch_size=1, verbose=False)
    assert max(s.done for s in seen if s.desc == "occlusion") < 64  # stopped well before its 8 x 8 masks
    # other threads and later calls hear nothing
    after = _heard(lambda: None)
    assert after == []
