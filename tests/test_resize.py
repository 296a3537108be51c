"""The library's bicubic resize of pixels and maps (``explainer/model/bicubic.py``) against PIL's own
``Image.resize(..., BICUBIC)`` on float images, channel by channel and map by map, over a class of
inputs: up and down, by integer and other factors, odd sizes, one-pixel sides, extreme aspect ratios,
one axis only, 1 to 5 channels, maps far beyond 0..255 and negative. The bound is 4 float32 ulps of the
data's magnitude (2**-21 x max|x|). Measured on x86-64 with Pillow 13.0 over 244 size pairs x 1, 3 and 4
channels of data in -1e4..1e4: 0 (bit-identical: the same taps summed in double in the same order,
rounded to float32 after each pass) except where Pillow 13 runs the vertical pass first, at most
1.0e-7 x max|x|."""
import numpy as np
import pytest
from PIL import Image

from explainer.model import bicubic
from explainer.model.preprocess import resize, resize_map

BOUND = 2.0 ** -21  # x max|x|: 4 ulps of float32 at the data's magnitude


def pil(x: np.ndarray, size) -> np.ndarray:
    """PIL on each channel of an H x W x C float image, as a float ('F') image."""
    h, w = size
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(x[:, :, c], np.float32))
                                .resize((w, h), Image.BICUBIC), np.float32) for c in range(x.shape[2])], axis=2)


def error(ours: np.ndarray, theirs: np.ndarray, x: np.ndarray) -> float:
    """max |ours - theirs| in units of max|x|."""
    assert ours.shape == theirs.shape and ours.dtype == np.float32
    return float(np.abs(ours.astype(np.float64) - theirs).max() / max(np.abs(x).max(), 1e-30))


def _pairs(seed: int, count: int, largest: int):
    """(in, out) size pairs, sides log-uniform in 1..largest."""
    rng = np.random.default_rng(seed)
    sides = np.exp(rng.uniform(0, np.log(largest), (count, 4))).astype(int)
    return [((int(a), int(b)), (int(c), int(d))) for a, b, c, d in sides]


CASES = [((300, 451), (224, 224)), ((224, 224), (300, 451)), ((10, 10), (40, 40)), ((40, 40), (10, 10)),
         ((37, 53), (101, 17)), ((1, 1), (5, 7)), ((5, 7), (1, 1)), ((1, 300), (7, 3)), ((300, 1), (2, 50)),
         ((3, 997), (61, 5)), ((17, 13), (17, 29)), ((17, 13), (9, 13)), ((2, 2), (3, 3)), ((600, 9), (7, 600))]


@pytest.mark.parametrize("shape, size", CASES + _pairs(0, 30, 160))
@pytest.mark.parametrize("channels", [1, 3])
def test_images_equal_pils(shape, size, channels):
    x = np.random.default_rng(sum(shape) + sum(size)).uniform(0, 255, (*shape, channels)).astype(np.float32)
    theirs = pil(x, size)
    assert error(resize(x, size, clip=False), theirs, x) <= BOUND
    clipped = resize(x, size)
    assert error(clipped, np.clip(theirs, 0, 255), x) <= BOUND and clipped.min() >= 0 and clipped.max() <= 255


@pytest.mark.parametrize("channels", [2, 4, 5])
def test_other_channel_counts_equal_pils(channels):
    x = np.random.default_rng(channels).uniform(0, 255, (23, 41, channels)).astype(np.float32)
    for size in [(11, 60), (50, 9)]:
        assert error(resize(x, size, clip=False), pil(x, size), x) <= BOUND


@pytest.mark.parametrize("grid, size", [((7, 7), (300, 451)), ((14, 14), (224, 224)), ((1, 1), (10, 10)),
                                        ((28, 28), (20, 500)), ((12, 9), (37, 1001)), ((7, 7), (7, 300)),
                                        ((300, 451), (7, 7))] + _pairs(1, 20, 120))
def test_maps_equal_pils(grid, size):
    """Maps are unclipped: values far beyond 0..255, negative, and 1e-3-sized ones beside them."""
    rng = np.random.default_rng(sum(grid) + sum(size))
    maps = (rng.standard_normal((3, *grid)) * [[[1e4]], [[1e-3]], [[1.0]]]).astype(np.float32)
    ours = resize_map(maps, size)
    for m, got in zip(maps, ours):
        assert error(got, pil(m[:, :, None], size)[:, :, 0], m) <= BOUND


def test_many_maps_and_leading_axes():
    maps = np.random.default_rng(5).standard_normal((2, 40, 7, 7)).astype(np.float32) * 300
    ours = resize_map(maps, (30, 45))
    assert ours.shape == (2, 40, 30, 45)
    assert error(ours[1, 33], pil(maps[1, 33][:, :, None], (30, 45))[:, :, 0], maps[1, 33]) <= BOUND


def test_a_wrong_coefficient_is_seen(monkeypatch):
    """The comparison can fail: the largest of PIL's weights off by 1e-5 of itself breaks the bound."""
    x = np.random.default_rng(7).uniform(0, 255, (300, 451, 3)).astype(np.float32)
    exact = bicubic._sparse
    wrong = exact(451, 224).copy()
    wrong.data = wrong.data.copy()
    wrong.data[np.argmax(wrong.data)] *= 1 + 1e-5
    monkeypatch.setattr(bicubic, "_sparse", lambda i, o: wrong if (i, o) == (451, 224) else exact(i, o))
    assert error(resize(x, (224, 224), clip=False), pil(x, (224, 224)), x) > BOUND


def test_same_size_and_types():
    x = np.random.default_rng(3).uniform(0, 255, (6, 8, 3))
    assert resize(x, (6, 8)) is x  # nothing to do
    assert resize(x, (3, 4)).dtype == np.float32 and resize(x.astype(np.uint8), (3, 4)).dtype == np.float32
    maps = x.transpose(2, 0, 1)
    same = resize_map(maps, (6, 8))
    assert same.dtype == np.float32 and not np.shares_memory(same, maps)
    assert error(resize(x.astype(np.uint8), (9, 5)), pil(x.astype(np.uint8), (9, 5)).clip(0, 255), x) <= BOUND


def test_pil_bicubic_matrix_is_the_band():
    """The dense matrix (the exported graph's constants) and the band the resize uses are one set of
    numbers; rows sum to 1."""
    for n_in, n_out in [(7, 224), (451, 224), (4000, 224), (1, 9), (9, 1), (5, 5)]:
        dense = bicubic.pil_bicubic_matrix(n_in, n_out)
        assert np.array_equal(bicubic._sparse(n_in, n_out).toarray(), dense)
        np.testing.assert_allclose(dense.sum(axis=1), 1.0, rtol=1e-12)
        first, count, weights = bicubic.band(n_in, n_out)
        assert not weights.flags.writeable and np.all(count >= 1) and np.all(first + count <= n_in)
