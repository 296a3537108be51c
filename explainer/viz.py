"""Pictures from plain arrays: MATLAB's ``mat2gray`` and ``imtile``, colour overlays, and ``plot_maps``
(the side-by-side figure of MATLAB's example)."""
from __future__ import annotations

import math
from typing import NamedTuple

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


#: colour maps, by what a map holds (``map_style``): signed maps (occlusion, LIME, KernelSHAP: evidence
#: for and against) on a diverging map centred at 0, white where nothing happens, red for, blue
#: against; unsigned maps (Grad-CAM, RISE, gradients) on MATLAB's jet
SIGNED_CMAP = "RdBu_r"
UNSIGNED_CMAP = "jet"
#: a map is sparse (pixel-level gradients) when under this share of its pixels reach a fifth of its
#: top value; sparse maps are drawn with opacity rising with the value, so the image stays visible
SPARSE_SHARE = 0.2


class MapStyle(NamedTuple):
    """How a map is drawn: colour map, value limits (symmetric about 0 for signed maps), and whether
    its opacity follows its magnitude."""

    cmap: str
    vmin: float
    vmax: float
    signed: bool
    sparse: bool

    def opacity(self, m: np.ndarray, alpha: float) -> np.ndarray | float:
        """Per-pixel opacity for sparse maps (alpha x |m| / top), else the constant alpha."""
        if not self.sparse:
            return alpha
        top = max(abs(self.vmin), abs(self.vmax)) or 1.0
        return alpha * np.clip(np.abs(np.nan_to_num(m)) / top, 0.0, 1.0)


def map_style(m, cmap: str = "auto") -> MapStyle:
    """The documented drawing of a map: ``cmap="auto"`` picks SIGNED_CMAP when the map has negative
    values (below -1e-3 of its largest magnitude), else UNSIGNED_CMAP; limits are the 99.5th
    percentile of |m| for sparse maps (a few extreme pixels would wash out the rest), else the
    extremes."""
    m = np.asarray(m, dtype=np.float32)
    finite = m[np.isfinite(m)]
    if finite.size == 0:
        finite = np.zeros(1, np.float32)
    magnitude = np.abs(finite)
    peak = float(magnitude.max())
    signed = bool(finite.min() < -1e-3 * peak) if peak > 0 else False
    sparse = peak > 0 and float(np.mean(magnitude >= 0.2 * peak)) < SPARSE_SHARE
    top = float(np.percentile(magnitude, 99.5)) if sparse else peak
    top = top if top > 0 else (peak or 1.0)
    if cmap == "auto":
        cmap = SIGNED_CMAP if signed else UNSIGNED_CMAP
    _colormap(cmap)
    if signed:
        return MapStyle(cmap, -top, top, True, sparse)
    lo = 0.0 if sparse else float(finite.min())
    return MapStyle(cmap, lo, top if sparse else float(finite.max()), False, sparse)


def _colormap(cmap: str):
    import matplotlib

    try:
        return matplotlib.colormaps[cmap]
    except (KeyError, ValueError):
        raise InvalidParameterError(f"cmap must be 'auto' or a matplotlib colormap name; got {cmap!r}.") from None


def colorize(m, cmap: str = "jet") -> np.ndarray:
    """A map → RGB float [0, 1] through a matplotlib colormap, after mat2gray."""
    return _colormap(cmap)(mat2gray(m))[..., :3].astype(np.float32)


def overlay(image, map_, alpha: float = 0.5, cmap: str = "auto") -> np.ndarray:
    """The image with the map's colours blended on top: RGB uint8 of the image's size, drawn as
    ``map_style`` says (diverging colours for signed maps; opacity following the value for sparse
    ones). The map is resized (bicubic) when its size differs."""
    from .model.preprocess import resize

    alpha = check_float("overlay", "alpha", alpha, minimum=0.0, maximum=1.0)
    pixels = to_pixels(image)
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    m = np.asarray(map_, dtype=np.float32)
    if m.ndim != 2:
        raise InvalidParameterError(f"overlay: map must be (H, W); got shape {m.shape}.")
    style = map_style(m, cmap)  # of the map as given: resizing rings, and would make it look signed
    if m.shape != pixels.shape[:2]:
        m = resize(m[:, :, None], pixels.shape[:2], clip=False)[:, :, 0]
    span = (style.vmax - style.vmin) or 1.0
    colours = _colormap(style.cmap)(np.clip((np.nan_to_num(m) - style.vmin) / span, 0, 1))[..., :3]
    a = style.opacity(m, alpha)
    a = a[..., None] if isinstance(a, np.ndarray) else a
    blended = (1 - a) * pixels / 255.0 + a * colours
    return np.clip(np.rint(blended * 255), 0, 255).astype(np.uint8)


def _show_map(fig, ax, shown, gray: bool, m, title: str, alpha: float, cmap: str) -> None:
    """The image with the map over it and a colour bar as tall as the image."""
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    h, w = shown.shape[:2]
    style = map_style(m, cmap)
    ax.imshow(shown.astype(np.uint8), cmap="gray" if gray else None)
    im = ax.imshow(m, cmap=style.cmap, vmin=style.vmin, vmax=style.vmax, alpha=style.opacity(m, alpha),
                   extent=(-0.5, w - 0.5, h - 0.5, -0.5))
    bar = make_axes_locatable(ax).append_axes("right", size="4%", pad=0.05)
    cb = fig.colorbar(im, cax=bar)
    cb.solids.set_alpha(1)  # the bar shows the colours themselves, not their opacity over the image
    cb.ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def plot_maps(image, map1, map2, title1: str = "", title2: str = "", alpha: float = 0.5, cmap: str = "auto",
              show_image: bool = True):
    """MATLAB's ``plotMaps``: the image, then the two maps over it, side by side, each map with a
    colour bar as tall as the image (colours as ``map_style`` picks them unless ``cmap`` names one).
    ``show_image=False`` drops the first panel. Returns a matplotlib Figure."""
    alpha = check_float("plot_maps", "alpha", alpha, minimum=0.0, maximum=1.0)
    if not isinstance(show_image, (bool, np.bool_)):
        raise InvalidParameterError(f"plot_maps: show_image must be True or False; got {show_image!r}.")
    pixels = to_pixels(image)
    maps = [np.asarray(m, dtype=np.float32) for m in (map1, map2)]
    for m in maps:
        if m.ndim != 2:
            raise InvalidParameterError(f"plot_maps: maps must be (H, W); got shape {m.shape}.")
        map_style(m, cmap)  # an unknown colour map fails before drawing
    gray = pixels.shape[2] == 1
    shown = pixels[:, :, 0] if gray else pixels
    panels = 3 if show_image else 2
    fig = figure(4.6 * panels, 4.4)
    axes = fig.subplots(1, panels)
    if show_image:
        axes[0].imshow(shown.astype(np.uint8), cmap="gray" if gray else None)
        axes[0].set_title("image", fontsize=9)
        axes[0].axis("off")
    for ax, m, title in zip(axes[panels - 2:], maps, (title1, title2)):
        _show_map(fig, ax, shown, gray, m, title, alpha, cmap)
    fig.tight_layout()
    return fig


def map_figure(image, map_, title: str = "", alpha: float = 0.5, cmap: str = "auto"):
    """One map over the image with its colour bar (the report's figure). Returns a matplotlib Figure."""
    alpha = check_float("map_figure", "alpha", alpha, minimum=0.0, maximum=1.0)
    pixels = to_pixels(image)
    m = np.asarray(map_, dtype=np.float32)
    if m.ndim != 2:
        raise InvalidParameterError(f"map_figure: map must be (H, W); got shape {m.shape}.")
    gray = pixels.shape[2] == 1
    fig = figure(4.2, 3.8)
    ax = fig.subplots()
    _show_map(fig, ax, pixels[:, :, 0] if gray else pixels, gray, m, title, alpha, cmap)
    fig.tight_layout()
    return fig


def top_k_figure(image, predictions, title: str = ""):
    """The image beside a table of the top classes and their scores (MATLAB's example opens with
    it). ``predictions``: ``net.top_k(image, k)``. Returns a matplotlib Figure."""
    pixels = to_pixels(image)
    gray = pixels.shape[2] == 1
    rows = [[str(r), p.label, f"{p.score:.4f}"] for r, p in enumerate(predictions, 1)]
    if not rows:
        raise InvalidParameterError("top_k_figure: predictions is empty; pass net.top_k(image, k).")
    fig = figure(8.4, 3.6)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.15]})
    left.imshow(pixels[:, :, 0] if gray else pixels.astype(np.uint8), cmap="gray" if gray else None)
    left.axis("off")
    right.axis("off")
    table = right.table(cellText=rows, colLabels=["#", "class", "score"], loc="center", cellLoc="left",
                        colLoc="left", colWidths=[0.1, 0.62, 0.22])
    table.auto_set_font_size(False)
    table.set_fontsize(10)
    table.scale(1, 1.6)
    for (row, _), cell in table.get_celld().items():
        cell.set_edgecolor("#cccccc")
        if row == 0:
            cell.set_text_props(weight="bold")
            cell.set_facecolor("#eef2f7")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def figure(width: float, height: float):
    """A matplotlib Figure outside pyplot: no backend is chosen or switched and no figure stays
    registered anywhere (the library has no global plotting state). Jupyter shows it when returned;
    ``fig.savefig`` writes it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)  # its own canvas: fig.canvas.draw() and savefig work without pyplot
    return fig
