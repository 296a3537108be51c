import numpy as np
import pytest

import explainer
from explainer.errors import InvalidParameterError, UnknownClassError

TOP3 = ["Egyptian cat", "tiger cat", "tabby"]


@pytest.fixture(scope="module")
def scores_layer(default_net):
    return explainer.gradcam_layers(default_net)[1]


def _low_frequency_share(image):
    gray = image.mean(axis=2)
    power = np.abs(np.fft.fftshift(np.fft.fft2(gray - gray.mean()))) ** 2
    h, w = power.shape
    yy, xx = np.mgrid[:h, :w]
    return power[np.hypot(yy - h / 2, xx - w / 2) < h / 16].sum() / power.sum()


def test_dreams_reach_their_classes(default_net, scores_layer):
    start = np.clip(128 + 20 * np.random.default_rng(0).standard_normal((224, 224, 3)), 0, 255).astype(np.uint8)
    idx = [default_net.class_index(c) for c in TOP3]
    assert default_net.predict(start)[idx].max() < 0.01
    images = explainer.deep_dream_image(default_net, scores_layer, TOP3, initial_image=start, verbose=False)
    assert images.shape == (3, 224, 224, 3) and images.dtype == np.float32
    assert images.min() == 0.0 and images.max() == 1.0
    probs = default_net.predict(list(images))  # at the input size; the coarse levels ran smaller
    for k, c in enumerate(idx):
        assert probs[k].argmax() == c and probs[k, c] > 0.5, (TOP3[k], probs[k, c])


@pytest.mark.slow
def test_pyramid_gives_large_scale_structure(default_net, scores_layer):
    kw = dict(num_iterations=30, random_state=0, verbose=False)  # 30 x 3 levels: low share 4.5x flat's
    flat = explainer.deep_dream_image(default_net, scores_layer, "tabby", pyramid_levels=1, **kw)[0]
    deep = explainer.deep_dream_image(default_net, scores_layer, "tabby", pyramid_levels=3, **kw)[0]
    assert default_net.predict(deep)[281] > 0.9
    assert _low_frequency_share(deep) > 2 * _low_frequency_share(flat)


def test_levels_run_at_their_own_size_where_the_graph_allows(default_net, scores_layer, monkeypatch):
    """A fully convolutional graph runs each level at its size (a quarter of the work at half the
    side); one with a flatten before its dense layer, at its input size."""
    from graphs import dense_classifier

    from explainer.runtime.torch_engine import torch_engine

    def seen_sizes(net, layer):
        sizes = []
        graph = torch_engine(net).graph_module
        monkeypatch.setattr(graph, "forward", lambda x, real=graph.forward: sizes.append(tuple(x.shape[-2:])) or real(x))
        explainer.deep_dream_image(net, layer, 1, num_iterations=1, pyramid_levels=3, verbose=False)
        monkeypatch.undo()
        return sizes

    assert set(seen_sizes(default_net, scores_layer)) == {(114, 114), (160, 160), (224, 224)}
    tried = torch_engine(default_net).runs_at_size  # the session's net: other tests may have tried more
    assert {(114, 114), (160, 160)} <= tried.keys() and all(tried.values())
    dense = explainer.load(dense_classifier(), preprocessing="none")
    sizes = seen_sizes(dense, "logits")  # one try at each level's size, then the input size
    assert sizes == [(8, 8), (16, 16), (11, 11), (16, 16), (16, 16)]
    assert torch_engine(dense).runs_at_size == {(8, 8): False, (11, 11): False}


def test_any_layer_seeded_and_regularised(default_net, capfd, monkeypatch):
    from functools import partialmethod

    from explainer import progress

    # every step drawn (tqdm draws at most every 0.1 s by default: what the screen showed depended on
    # the machine's speed)
    bar_class = progress._bar_class()
    monkeypatch.setattr(bar_class, "__init__", partialmethod(bar_class.__init__, mininterval=0))
    layer = "/_blocks.6/Add"
    a = explainer.deep_dream_image(default_net, layer, [0, 3], num_iterations=2, pyramid_levels=2,
                                   random_state=4, verbose=True)
    shown = capfd.readouterr()  # MATLAB's table of iterations, as one progress line
    assert shown.out == "" and "4/4" in shown.err and "level 2/2, activation strength" in shown.err
    b = explainer.deep_dream_image(default_net, layer, [0, 3], num_iterations=2, pyramid_levels=2,
                                   random_state=4, verbose=False)
    assert capfd.readouterr() == ("", "")
    np.testing.assert_array_equal(a, b)
    reg = explainer.deep_dream_image(default_net, layer, 1, num_iterations=2, pyramid_levels=1, jitter=4,
                                     blur=1.0, tv_weight=0.1, random_state=0, verbose=False,
                                     output_scaling="none")
    assert reg.shape == (1, 224, 224, 3) and np.isfinite(reg).all() and reg.max() <= 255


def test_errors(default_net, scores_layer):
    with pytest.raises(UnknownClassError, match="Closest"):
        explainer.deep_dream_image(default_net, scores_layer, "tabbby", verbose=False)
    with pytest.raises(InvalidParameterError, match="class names are allowed only"):
        explainer.deep_dream_image(default_net, "/_blocks.6/Add", "tabby", verbose=False)
    with pytest.raises(InvalidParameterError, match="out of range"):
        explainer.deep_dream_image(default_net, "/_blocks.6/Add", 5000, num_iterations=1, verbose=False)
    with pytest.raises(InvalidParameterError, match="pyramid_scale"):
        explainer.deep_dream_image(default_net, scores_layer, 1, pyramid_scale=0.5, verbose=False)
