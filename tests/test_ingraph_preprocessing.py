"""A graph that normalises its own input is fed raw pixels: the same network exported with and without
in-graph normalisation gives the same scores and maps from the same image (never normalised twice);
a default that guesses says so."""
import logging

import numpy as np
import pytest

import explainer

import exports

VARIANTS = ("ingraph-nchw-float", "ingraph-nhwc-float", "ingraph-nchw-uint8", "production")


@pytest.fixture(scope="module")
def plain():
    return {e: explainer.load(exports.export("resnet18", e)) for e in ("legacy", "dynamo")}


@pytest.mark.parametrize("exporter", ["legacy", pytest.param("dynamo", marks=pytest.mark.slow)])
@pytest.mark.parametrize("variant", VARIANTS)
def test_in_graph_normalisation_is_detected_and_not_repeated(plain, exporter, variant, chelsea, caplog):
    reference = plain[exporter]
    # integer pixels at the network's size: what a uint8 input sees is then what a float input sees
    chelsea = np.rint(reference.prepare(chelsea)[0][0]).astype(np.uint8)
    assert reference.preprocessing.name == "imagenet" and "guessed" in reference.preprocessing.origin
    with caplog.at_level(logging.INFO, logger="explainer"):
        net = explainer.load(exports.export("resnet18", exporter, variant))
    assert net.preprocessing.name == "none", net.preprocessing
    assert "normalises its input itself" in net.preprocessing.origin
    assert any("normalises its input itself" in r.getMessage() for r in caplog.records)
    # the same probabilities and maps from the same image, whatever the input contract
    np.testing.assert_allclose(net.predict(chelsea), reference.predict(chelsea), rtol=2e-3, atol=1e-6)
    label = reference.top_k(chelsea, 1)[0].index
    # The same maps pointwise: both graphs compute one function, the normalisation rounded in another
    # place (a float32 ulp, 6e-8 relative), which the network carries to the maps as 1.2e-7 (gradient)
    # and 1.4e-6 (Grad-CAM) of their largest value (measured, legacy exports); 1e-5 leaves a margin,
    # while normalising twice or in the wrong channel order moves them by over 1e-2.
    for method in (lambda n: explainer.gradient_attribution(n, chelsea, label, verbose=False),
                   lambda n: explainer.gradcam(n, chelsea, label)):
        ours, theirs = method(net), method(reference)
        assert theirs.max() > 0
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * float(np.abs(theirs).max()))


def test_guess_is_logged_once_and_explicit_choices_win(chelsea, caplog):
    path = exports.export("resnet18", "legacy")
    with caplog.at_level(logging.WARNING, logger="explainer"):
        net = explainer.load(path)
    assert [r.getMessage() for r in caplog.records if "guessed" in r.getMessage()] and \
        len([r for r in caplog.records if "guessed" in r.getMessage()]) == 1
    assert "imagenet" in repr(net) and "guessed" in repr(net)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="explainer"):
        given = explainer.load(path, preprocessing="imagenet")
    assert not caplog.records and given.preprocessing.origin == "argument"
    normalised = explainer.load(exports.export("resnet18", "legacy", "ingraph-nhwc-float"), preprocessing="imagenet")
    assert normalised.preprocessing.name == "imagenet"  # an argument overrides what the graph says


def test_constants_of_unit_images_mean_pixels_scaled_to_unit():
    """(x - 0.5) / 0.25 inside the graph: it was trained on 0..1 pixels, so it gets x / 255."""
    from onnx import helper, numpy_helper

    from graphs import linear_classifier

    model, reference = linear_classifier(k=3, size=(8, 8))
    g = model.graph
    g.initializer.extend([numpy_helper.from_array(np.array(0.5, np.float32), "m"),
                          numpy_helper.from_array(np.array(0.25, np.float32), "s")])
    conv = next(n for n in g.node if n.op_type == "Conv")
    conv.input[0] = "normalised"
    g.node.insert(0, helper.make_node("Sub", ["image", "m"], ["centred"]))
    g.node.insert(1, helper.make_node("Div", ["centred", "s"], ["normalised"]))
    net = explainer.load(model)
    assert net.preprocessing.name == "unit" and "normalises its input itself" in net.preprocessing.origin
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(np.uint8)
    x = (image.astype(np.float64).transpose(2, 0, 1)[None] / 255 - 0.5) / 0.25
    np.testing.assert_allclose(net.logits(image), reference(x)[0], rtol=1e-5)
