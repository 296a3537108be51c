"""Every accepted image form becomes the same canonical pixels; bad images get one clear error."""
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from explainer.errors import InvalidImageError, InvalidParameterError, InvalidParameterTypeError, ResourceLimitError
from explainer.io import to_pixels


@pytest.fixture
def rgb():
    return np.random.default_rng(0).integers(0, 256, (12, 17, 3), dtype=np.uint8)


def test_forms_agree(tmp_path, rgb):
    Image.fromarray(rgb).save(tmp_path / "a.png")
    expected = rgb.astype(np.float32)
    for form in (rgb, rgb / 255.0, Image.fromarray(rgb), tmp_path / "a.png", str(tmp_path / "a.png"),
                 np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])):
        np.testing.assert_allclose(to_pixels(form), expected, atol=1e-4)


def test_gray_16bit_palette_cmyk_la(tmp_path, rgb):
    gray = rgb[:, :, 0]
    assert to_pixels(gray).shape == (12, 17, 1)
    Image.fromarray((gray.astype(np.uint16) * 257)).save(tmp_path / "g16.png")
    np.testing.assert_allclose(to_pixels(tmp_path / "g16.png")[:, :, 0], gray, atol=1e-3)
    pal = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=16)
    pal.save(tmp_path / "p.png")
    np.testing.assert_allclose(to_pixels(tmp_path / "p.png"), np.asarray(pal.convert("RGB")), atol=1e-4)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg")
    assert to_pixels(tmp_path / "c.jpg").shape == (12, 17, 3)
    Image.fromarray(gray).convert("LA").save(tmp_path / "la.png")
    np.testing.assert_allclose(to_pixels(tmp_path / "la.png")[:, :, 0], gray, atol=1e-4)


def test_exif_orientation_applied(tmp_path, rgb):
    img = Image.fromarray(rgb)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "o.jpg", exif=exif, quality=100)
    assert to_pixels(tmp_path / "o.jpg").shape == (17, 12, 3)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((0, 5, 3), np.uint8), "empty"),
    (np.zeros((3, 20, 30), np.uint8), "channels-first"),
    (np.full((4, 4, 3), 1.5), r"\[0, 1\]"),
    (np.full((4, 4, 3), np.nan), "NaN"),
    (np.full((4, 4, 3), 300, np.int32), "0..255"),
    (np.zeros((4, 4, 3, 2)), "H x W"),
])
def test_bad_arrays(bad, match):
    with pytest.raises(InvalidImageError, match=match):
        to_pixels(bad)


def test_bad_types_and_files(tmp_path):
    with pytest.raises(InvalidParameterTypeError):
        to_pixels(42)
    (tmp_path / "x.png").write_bytes(b"not an image")
    with pytest.raises(InvalidImageError, match="allowed formats"):
        to_pixels(tmp_path / "x.png")
    with pytest.raises(InvalidImageError, match="does not exist"):
        to_pixels(tmp_path / "none.png")
    buf = tmp_path / "t.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 100).save(buf)
    (tmp_path / "cut.png").write_bytes(buf.read_bytes()[:80])
    with pytest.raises(InvalidImageError, match="truncated|corrupt|cannot"):
        to_pixels(tmp_path / "cut.png")


def _png_header_only(width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_decompression_bomb_refused_from_header(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(100_000, 100_000))  # 10 giga-pixels declared in 60 bytes
    with pytest.raises(ResourceLimitError, match="MAX_IMAGE_PIXELS"):
        to_pixels(path)


def test_sample_names_work_wherever_an_image_does():
    from explainer.io import to_pixels
    from explainer.samples import SAMPLES, sample_image

    for name in SAMPLES:
        np.testing.assert_array_equal(to_pixels(f"sample:{name}"), sample_image(name).astype(np.float32))
    with pytest.raises(InvalidParameterError, match="must be one of"):
        to_pixels("sample:nope")
