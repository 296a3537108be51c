"""Pictures from plain arrays: MATLAB's ``mat2gray`` and ``imtile``, colour overlays, and ``plot_maps``
(the side-by-side figure of MATLAB's example)."""
from __future__ import annotations

import math

import numpy as np

from .errors import InvalidParameterError
from .io import to_pixels
from .validation import check_float


def mat2gray(a) -> np.ndarray:
    """Linearly rescale to [0, 1] (min → 0, max → 1); a constant array becomes zeros. float32."""
    a = np.asarray(a, dtype=np.float64)
    if a.size == 0:
        raise InvalidParameterError("mat2gray: the array is empty.")
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return np.zeros(a.shape, np.float32)
    lo, hi = finite.min(), finite.max()
    out = np.zeros(a.shape) if hi == lo else (np.nan_to_num(a, nan=lo) - lo) / (hi - lo)
    return np.clip(out, 0, 1).astype(np.float32)


def imtile(activations, channels=None, grid=None, border: int = 1) -> np.ndarray:
    """Tile (C, H, W) activations (each channel rescaled to [0, 1]) into one 2-D image, row by row,
    like MATLAB's ``imtile``; ``channels`` picks and orders them, ``grid`` = (rows, cols)."""
    acts = np.asarray(activations, dtype=np.float32)
    if acts.ndim != 3:
        raise InvalidParameterError(f"imtile: activations must be (C, H, W); got shape {acts.shape}.")
    if channels is not None:
        channels = list(np.atleast_1d(channels))
        bad = [c for c in channels if not 0 <= int(c) < acts.shape[0]]
        if bad:
            raise InvalidParameterError(f"imtile: channels must be in [0, {acts.shape[0] - 1}]; got {bad}.")
        acts = acts[[int(c) for c in channels]]
    n, h, w = acts.shape
    rows, cols = grid if grid is not None else (int(math.ceil(n / math.ceil(math.sqrt(n)))), int(math.ceil(math.sqrt(n))))
    if rows * cols < n:
        raise InvalidParameterError(f"imtile: a {rows}x{cols} grid cannot hold {n} channels.")
    out = np.ones((rows * (h + border) - border, cols * (w + border) - border), np.float32)
    for i in range(n):
        r, c = divmod(i, cols)
        out[r * (h + border):r * (h + border) + h, c * (w + border):c * (w + border) + w] = mat2gray(acts[i])
    return out


def colorize(m, cmap: str = "jet") -> np.ndarray:
    """A map → RGB float [0, 1] through a matplotlib colormap, after mat2gray."""
    import matplotlib

    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError:
        raise InvalidParameterError(f"cmap must be a matplotlib colormap name; got {cmap!r}.") from None
    return colormap(mat2gray(m))[..., :3].astype(np.float32)


def overlay(image, map_, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """The image with the map's colours blended on top: RGB uint8 of the image's size. The map is
    resized (bicubic) when its size differs."""
    from .model.preprocess import resize

    alpha = check_float("overlay", "alpha", alpha, minimum=0.0, maximum=1.0)
    pixels = to_pixels(image)
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    m = np.asarray(map_, dtype=np.float32)
    if m.ndim != 2:
        raise InvalidParameterError(f"overlay: map must be (H, W); got shape {m.shape}.")
    if m.shape != pixels.shape[:2]:
        m = resize(m[:, :, None], pixels.shape[:2], clip=False)[:, :, 0]
    blended = (1 - alpha) * pixels / 255.0 + alpha * colorize(m, cmap)
    return np.clip(np.rint(blended * 255), 0, 255).astype(np.uint8)


def plot_maps(image, map1, map2, title1: str = "", title2: str = "", alpha: float = 0.5, cmap: str = "jet",
              show_image: bool = True):
    """MATLAB's ``plotMaps``: the image, then the two maps over it, side by side, each map with a
    colour bar as tall as the image. ``show_image=False`` drops the first panel. Returns a matplotlib
    Figure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    alpha = check_float("plot_maps", "alpha", alpha, minimum=0.0, maximum=1.0)
    if not isinstance(show_image, (bool, np.bool_)):
        raise InvalidParameterError(f"plot_maps: show_image must be True or False; got {show_image!r}.")
    pixels = to_pixels(image)
    maps = [np.asarray(m, dtype=np.float32) for m in (map1, map2)]
    for m in maps:
        if m.ndim != 2:
            raise InvalidParameterError(f"plot_maps: maps must be (H, W); got shape {m.shape}.")
    h, w = pixels.shape[:2]
    shown = pixels[:, :, 0] if pixels.shape[2] == 1 else pixels
    panels = 3 if show_image else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 4.4))
    if show_image:
        axes[0].imshow(shown.astype(np.uint8), cmap="gray" if pixels.shape[2] == 1 else None)
        axes[0].set_title("image")
        axes[0].axis("off")
    for ax, m, title in zip(axes[panels - 2:], maps, (title1, title2)):
        ax.imshow(shown.astype(np.uint8), cmap="gray" if pixels.shape[2] == 1 else None)
        im = ax.imshow(m, cmap=cmap, alpha=alpha, extent=(-0.5, w - 0.5, h - 0.5, -0.5))
        bar = make_axes_locatable(ax).append_axes("right", size="4%", pad=0.05)  # as tall as the image
        fig.colorbar(im, cax=bar)
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    return fig
