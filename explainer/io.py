"""Turning whatever the user passes as an image into one canonical array.

Canonical form: float32, H x W x 3 (or x 1), RGB order, pixel units 0..255. Accepted inputs: paths,
PIL images and numpy arrays (uint8 0..255, uint16 0..65535, bool, float in [0, 1]); grayscale, RGBA
(alpha dropped, as MATLAB's imread does), palette and CMYK files. Files are decoded by Pillow from an
allow-list of formats, after the header's size is checked against ``limits.MAX_IMAGE_PIXELS``.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from . import limits
from .errors import InvalidImageError, InvalidParameterTypeError, ResourceLimitError

ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF", "PPM")


def _pil():
    from PIL import Image, ImageOps

    return Image, ImageOps


def read_image(path) -> np.ndarray:
    """Decode an image file into the canonical float32 H x W x C (RGB or gray) array in 0..255."""
    Image, ImageOps = _pil()
    path = Path(path)
    if not path.is_file():
        raise InvalidImageError(f"image file {str(path)!r} does not exist or is not a file.")
    size = path.stat().st_size
    if size == 0:
        raise InvalidImageError(f"image file {str(path)!r} is empty.")
    if size > limits.MAX_IMAGE_BYTES:
        raise ResourceLimitError(
            f"image file {str(path)!r} is {size} bytes, over limits.MAX_IMAGE_BYTES="
            f"{limits.MAX_IMAGE_BYTES}; raise the limit if the file is trusted.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's DecompressionBombWarning: we check ourselves
            img = Image.open(path, formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ResourceLimitError(
            f"{str(path)!r} declares too many pixels ({exc}); limits.MAX_IMAGE_PIXELS="
            f"{limits.MAX_IMAGE_PIXELS}; raise the limit if the image is trusted.") from None
    except Exception as exc:  # Pillow raises many types for unreadable files
        raise InvalidImageError(
            f"cannot read {str(path)!r} as an image ({exc}); allowed formats: "
            f"{', '.join(ALLOWED_FORMATS)}.") from None
    with img:
        return from_pil(img, source=str(path))


def from_pil(img, source: str = "PIL image") -> np.ndarray:
    Image, ImageOps = _pil()
    width, height = img.size
    if width * height > limits.MAX_IMAGE_PIXELS:
        raise ResourceLimitError(
            f"{source} is {width}x{height} = {width * height} pixels, over limits.MAX_IMAGE_PIXELS="
            f"{limits.MAX_IMAGE_PIXELS}; raise the limit if the image is trusted.")
    if width == 0 or height == 0:
        raise InvalidImageError(f"{source} is empty ({width}x{height}).")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
            img = ImageOps.exif_transpose(img)
    except Exception as exc:
        raise InvalidImageError(f"cannot decode {source}: truncated or corrupt ({exc}).") from None
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        return _finish(np.clip(arr, 0, top) * (255.0 / top), source)
    if mode == "F":
        return from_array(np.asarray(img, dtype=np.float32), source)
    if mode in ("1", "L", "LA"):
        return _finish(np.asarray(img.convert("L"), dtype=np.float32), source)
    return _finish(np.asarray(img.convert("RGB"), dtype=np.float32), source)


def _finish(arr: np.ndarray, source: str) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr, dtype=np.float32)


def from_array(arr: np.ndarray, source: str = "image array") -> np.ndarray:
    """Validate a numpy image and convert it to the canonical form."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise InvalidImageError(
            f"{source} must be H x W or H x W x C; got an array of shape {arr.shape}. "
            "For a batch, pass a list of images or an N x H x W x C array.")
    h, w, c = arr.shape
    if c not in (1, 3, 4) and arr.shape[0] in (1, 3, 4):
        raise InvalidImageError(
            f"{source} has shape {arr.shape}, which looks channels-first; images are H x W x C: "
            "use image.transpose(1, 2, 0).")
    if c not in (1, 3, 4):
        raise InvalidImageError(f"{source} must have 1, 3 or 4 channels; got shape {arr.shape}.")
    if h == 0 or w == 0:
        raise InvalidImageError(f"{source} is empty (shape {arr.shape}).")
    if h * w > limits.MAX_IMAGE_PIXELS:
        raise ResourceLimitError(
            f"{source} has {h * w} pixels, over limits.MAX_IMAGE_PIXELS={limits.MAX_IMAGE_PIXELS}.")
    if c == 4:
        arr = arr[:, :, :3]  # alpha is dropped, as MATLAB's imread does
    kind = arr.dtype.kind
    if arr.dtype == np.uint8:
        out = arr.astype(np.float32)
    elif arr.dtype == np.uint16:
        out = arr.astype(np.float32) * (255.0 / 65535.0)
    elif kind == "b":
        out = arr.astype(np.float32) * 255.0
    elif kind in "iu":
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise InvalidImageError(
                f"{source} is an integer array ({arr.dtype}) with values in [{lo}, {hi}]; integer "
                "images must lie in 0..255 (or use uint16 for 0..65535).")
        out = arr.astype(np.float32)
    elif kind == "f":
        if not np.all(np.isfinite(arr)):
            raise InvalidImageError(f"{source} contains NaN or infinite pixels.")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise InvalidImageError(
                f"{source} is a float array with values in [{lo:g}, {hi:g}]; float images must lie "
                "in [0, 1]. Divide 0..255 data by 255, or pass it as uint8.")
        out = arr.astype(np.float32) * 255.0
    else:
        raise InvalidImageError(f"{source} has unsupported dtype {arr.dtype}.")
    return np.ascontiguousarray(out, dtype=np.float32)


def to_pixels(image, source: str = "image") -> np.ndarray:
    """One image (path, ``"sample:NAME"``, PIL image or array) → canonical float32 H x W x C in 0..255."""
    if isinstance(image, str) and image.startswith("sample:"):
        from .samples import resolve

        return from_array(resolve(image), source)
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    if isinstance(image, np.ndarray):
        return from_array(image, source)
    try:
        Image, _ = _pil()
        if isinstance(image, Image.Image):
            return from_pil(image, source)
    except ImportError:  # pragma: no cover - Pillow is a dependency
        pass
    raise InvalidParameterTypeError(
        f"{source} must be a file path, \"sample:NAME\", a PIL image or a numpy array (H x W x C); got "
        f"{type(image).__name__}.")


def to_pixel_batch(images) -> tuple[list[np.ndarray], bool]:
    """Images as given to a public function → (list of canonical images, whether a batch was given)."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return [to_pixels(im, f"image {i}") for i, im in enumerate(images)], True
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise InvalidImageError("an empty list of images was given; pass at least one image.")
        return [to_pixels(im, f"image {i}") for i, im in enumerate(images)], True
    return [to_pixels(images)], False
