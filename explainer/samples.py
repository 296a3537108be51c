"""Sample images that install with the dependencies (no download): ``sample_image("chelsea")``."""
from __future__ import annotations

import numpy as np

from .errors import InvalidParameterError

SAMPLES = ("chelsea", "coffee", "astronaut", "grace_hopper", "china", "flower")
PREFIX = "sample:"


def sample_image(name: str) -> np.ndarray:
    """An RGB uint8 H x W x 3 sample image by name (one of ``SAMPLES``)."""
    if name in ("chelsea", "coffee", "astronaut"):
        from skimage import data

        return getattr(data, name)()
    if name == "grace_hopper":
        import matplotlib.cbook
        from PIL import Image, ImageOps

        path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
        with Image.open(path) as im:  # a file of the matplotlib wheel, not user input
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"), dtype=np.uint8)
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")
    raise InvalidParameterError(f"sample image must be one of {SAMPLES}; got {name!r}.")


def resolve(image):
    """``"sample:NAME"`` strings become the sample array; everything else passes through."""
    if isinstance(image, str) and image.startswith(PREFIX):
        return sample_image(image[len(PREFIX):])
    return image
