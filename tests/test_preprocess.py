"""Preprocessing presets against hand-written formulas, and antialiased resizing."""
import numpy as np
import pytest
from PIL import Image

from explainer.errors import InvalidParameterError
from explainer.model.preprocess import PRESETS, resize, resolve


@pytest.fixture
def pixels():
    return np.random.default_rng(0).uniform(0, 255, (4, 5, 3)).astype(np.float32)


def test_presets_match_formulas(pixels):
    x = pixels.astype(np.float64)
    np.testing.assert_allclose(PRESETS["imagenet"].normalise(pixels),
                               (x / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225], rtol=1e-5)
    np.testing.assert_allclose(PRESETS["caffe"].normalise(pixels),
                               x[..., ::-1] - [103.939, 116.779, 123.68], rtol=1e-5)
    np.testing.assert_allclose(PRESETS["tf"].normalise(pixels), x / 127.5 - 1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(PRESETS["none"].normalise(pixels), x, rtol=1e-6)


def test_custom_preprocessing(pixels):
    pre = resolve({"mean": [1, 2, 3], "std": 2, "scale": 0.5, "channel_order": "BGR"})
    np.testing.assert_allclose(pre.normalise(pixels), (pixels[..., ::-1] * 0.5 - [1, 2, 3]) / 2, rtol=1e-5)


@pytest.mark.parametrize("preset", ["imagenet", "caffe", "tf", "custom-bgr"])
@pytest.mark.parametrize("shape", [(2, 17, 13, 3), (17, 13, 3), (1, 5, 4, 1)])
def test_channels_first_is_the_same_values_transposed(preset, shape):
    """The model input written plane by plane (NCHW) holds exactly the channels-last values."""
    pre = (resolve({"mean": [1, 2, 3], "std": [2, 3, 0.7], "scale": 0.5, "channel_order": "BGR"})
           if preset == "custom-bgr" else PRESETS[preset])
    pixels = np.random.default_rng(1).uniform(0, 255, shape).astype(np.float32)
    last, first = pre.normalise(pixels), pre.normalise(pixels, channels_first=True)
    assert first.dtype == np.float32 and first.flags.c_contiguous and first.shape == np.moveaxis(last, -1, -3).shape
    np.testing.assert_array_equal(first, np.moveaxis(last, -1, -3))
    x = pixels.astype(np.float64)[..., ::-1] if pre.channel_order == "BGR" and shape[-1] == 3 else pixels
    c = shape[-1]
    mean, std = np.resize(pre.mean, c), np.resize(pre.std, c)
    np.testing.assert_allclose(first, np.moveaxis((x * pre.scale - mean) / std, -1, -3), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bad, match", [
    ("imagenette", "one of"), ({"mean": [1, 2]}, "mean"), ({"std": 0}, "non-zero"),
    ({"channel_order": "GBR"}, "channel_order"), ({"colour": 1}, "unknown keys")])
def test_bad_preprocessing(bad, match):
    with pytest.raises(InvalidParameterError, match=match):
        resolve(bad)


def test_resize_is_antialiased_bicubic_like_pillow(chelsea):
    img = chelsea
    ours = resize(img.astype(np.float32), (224, 224))
    pil = np.asarray(Image.fromarray(img).resize((224, 224), Image.BICUBIC), dtype=np.float32)
    assert ours.shape == (224, 224, 3)
    # Pillow's uint8 path rounds (and clips its intermediate pass); float resizing does neither
    assert np.abs(ours - pil).max() <= 1.5 and np.abs(ours - pil).mean() < 0.35  # two roundings
    # a one-pixel checkerboard shrunk 4x becomes flat gray (no aliasing)
    board = (np.indices((400, 400)).sum(0) % 2 * 255).astype(np.float32)[:, :, None]
    small = resize(board, (100, 100))
    assert np.abs(small[5:-5, 5:-5] - 127.5).max() < 2


@pytest.mark.parametrize("producer, version, says", [
    ("tf2onnx", "1.17.0 abc", "'caffe'"), ("keras", "3.12", "'tf'"), ("PaddlePaddle", "3.0", "'imagenet'"),
    ("paddle2onnx", "2.0", "'imagenet'"), ("jax2onnx", "0.9", "'unit'"), ("pytorch", "2.14.1", "0.5"),
    ("some-tool", "1", "no known convention"), ("", "", "does not say")])
def test_guessed_preprocessing_names_the_producer(caplog, producer, version, says):
    """With no metadata and no normalisation in the graph, the warning says which program wrote the
    file and what that program's models usually expect; never a silent guess."""
    import logging

    import explainer
    from graphs import linear_classifier

    model, _ = linear_classifier()
    model.producer_name, model.producer_version = producer, version
    with caplog.at_level(logging.WARNING, logger="explainer"):
        net = explainer.load(model)
    warned = [r.getMessage() for r in caplog.records if "guessed" in r.getMessage()]
    assert len(warned) == 1 and says in warned[0] and says in net.preprocessing.origin
    if producer:
        assert producer in warned[0]


@pytest.mark.parametrize("nominal, fmt, expected", [
    ("Normalized_0_1", "Rgb8", lambda x: x / 255), ("Normalized_1_1", None, lambda x: x / 127.5 - 1),
    ("NominalRange_0_255", "Bgr8", lambda x: x[..., ::-1]), (None, "Bgr8", lambda x: x[..., ::-1])])
def test_onnx_standard_image_metadata_is_read(pixels, nominal, fmt, expected):
    """ONNX's own image metadata (Image.NominalPixelRange, Image.BitmapPixelFormat) states the input's
    range and channel order: read, not guessed."""
    import explainer
    from graphs import linear_classifier

    model, _ = linear_classifier()
    for key, value in (("Image.NominalPixelRange", nominal), ("Image.BitmapPixelFormat", fmt)):
        if value is not None:
            model.metadata_props.add(key=key, value=value)
    net = explainer.load(model)
    assert net.preprocessing.origin.startswith("metadata")
    np.testing.assert_allclose(net.preprocessing.normalise(pixels), expected(pixels.astype(np.float64)),
                               rtol=1e-5, atol=1e-6)


def test_unknown_standard_image_metadata_is_refused():
    import explainer
    from graphs import linear_classifier

    model, _ = linear_classifier()
    model.metadata_props.add(key="Image.NominalPixelRange", value="NominalRange_16_235")
    with pytest.raises(InvalidParameterError, match="NominalRange_16_235.*preprocessing="):
        explainer.load(model)
