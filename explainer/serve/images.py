"""Request bytes → the library's canonical pixels, safely.

An image reaches the service only as bytes (a multipart upload, or base64 in JSON, optionally a
``data:`` URL): never as a name, so no request can make the service read a file or fetch a URL. The
bytes are opened by Pillow from ``explainer.io``'s allow-list of formats, the declared size is checked
against the service's ``max_pixels`` before a pixel is decoded (an image bomb costs its header), and
``explainer.io.to_pixels`` decodes it with the library's own checks. Every failure is the library's
typed error (``InvalidImageError``, ``ResourceLimitError``), so the service answers 4xx with its message.
"""
from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

import numpy as np

from ..errors import InvalidImageError, ResourceLimitError
from ..io import ALLOWED_FORMATS, to_pixels

_DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.IGNORECASE)


def from_base64(text: str, where: str = "image") -> bytes:
    """The bytes of base64 text (standard or URL-safe alphabet, an optional ``data:...;base64,`` prefix)."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidImageError(f"{where}: base64 text of an image file is needed; got "
                                f"{'empty text' if isinstance(text, str) else type(text).__name__}.")
    text = _DATA_URL.sub("", text.strip(), count=1)
    text = re.sub(r"\s+", "", text).replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImageError(f"{where}: not valid base64 (the standard alphabet, or the URL-safe one).") from None


def decode(data: bytes, max_pixels: int, where: str = "image") -> np.ndarray:
    """Image file bytes → canonical float32 H x W x C pixels (0..255), as ``explainer.io`` makes them."""
    from PIL import Image

    if not data:
        raise InvalidImageError(f"{where}: the image is empty (0 bytes).")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's DecompressionBombWarning: checked below
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ResourceLimitError(f"{where}: the image declares too many pixels ({exc}); the service "
                                 f"decodes at most {max_pixels}.") from None
    except Image.UnidentifiedImageError:
        raise InvalidImageError(f"{where}: the bytes are not an image in an allowed format "
                                f"({', '.join(ALLOWED_FORMATS)}).") from None
    except Exception as exc:  # Pillow raises many types for data it cannot read
        raise InvalidImageError(f"{where}: cannot read the bytes as an image ({type(exc).__name__}: "
                                f"{str(exc)[:200]}); allowed formats: {', '.join(ALLOWED_FORMATS)}.") from None
    with img:
        width, height = img.size
        if width * height > max_pixels:
            raise ResourceLimitError(f"{where}: the image is {width}x{height} = {width * height} pixels; the "
                                     f"service decodes at most {max_pixels} (--max-pixels).")
        return to_pixels(img, where)


def for_library(pixels: np.ndarray) -> np.ndarray:
    """Canonical pixels as the public functions take them: uint8 when they are whole numbers (every
    8-bit file), so that the service's maps are those of the same file given to the library; else
    floats in [0, 1]."""
    rounded = np.rint(pixels)
    if np.array_equal(rounded, pixels):
        return rounded.astype(np.uint8)
    return np.clip(pixels / 255.0, 0.0, 1.0).astype(np.float32)
