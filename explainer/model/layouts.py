"""How a layer's activations show themselves as (C, H, W) feature maps.

CNNs give (C, H, W) per image. Vision transformers give tokens: (T, C) with T = prefix + h*w, the
prefix being class and distillation tokens (ViT, DeiT), or none (Swin's windows merged back, LeViT);
some give channels-last grids (H, W, C) (torchvision's Swin, ConvNeXt's norms). The grid (h, w) is
one the image is cut into: ceil(size / stride) for some stride, as patch embeddings and strided
convolutions make it. Grad-CAM, activations and deep dream read every layer through its layout, so a
layer that is not a feature map (attention scores and probabilities, found from the graph's wiring by
``structure``; q/k/v split into heads; tensors the image does not reach) is refused by all three with
the same LayerNotFeatureMapError (``Classifier.feature_map_layout``).
"""
from __future__ import annotations

from dataclasses import dataclass
from math import ceil

import numpy as np

KINDS = ("CHW", "tokens", "HWC")
MAX_PREFIX = 2  # class token, distillation token
MAX_STRIDE = 64


@dataclass(frozen=True)
class FeatureLayout:
    kind: str  # one of KINDS
    channels: int
    grid: tuple[int, int]
    prefix: int = 0  # leading non-spatial tokens (kind "tokens")

    def describe(self) -> str:
        h, w = self.grid
        if self.kind == "CHW":
            return f"{self.channels}x{h}x{w} feature map"
        if self.kind == "HWC":
            return f"{h}x{w}x{self.channels} channels-last grid"
        extra = f" after {self.prefix} class token(s)" if self.prefix else ""
        return f"{h * w} tokens of {self.channels} channels on a {h}x{w} grid{extra}"

    def to_chw(self, x):
        """Activations (N, *per-image shape) → (N, C, h, w); numpy arrays or torch tensors (a view where
        it can be, differentiable)."""
        n = x.shape[0]
        h, w = self.grid
        if self.kind == "CHW":
            return x
        if self.kind == "HWC":
            return _permute(x, (0, 3, 1, 2))
        spatial = x[:, self.prefix:, :]
        return _permute(spatial.reshape(n, h, w, self.channels), (0, 3, 1, 2))


def _permute(x, order):
    return x.transpose(order) if isinstance(x, np.ndarray) else x.permute(*order)


def image_grids(size: tuple[int, int]) -> set[tuple[int, int]]:
    """The (h, w) grids an image of ``size`` is cut into by strides 1..MAX_STRIDE (rounded up or down)."""
    height, width = size
    grids = set()
    for s in range(1, MAX_STRIDE + 1):
        for rnd in (ceil, lambda v: int(v)):
            h, w = rnd(height / s), rnd(width / s)
            if h >= 1 and w >= 1:
                grids.add((h, w))
    return grids


def feature_layout(shape, size: tuple[int, int], token_channels: set[int] | None = None) -> FeatureLayout | None:
    """The layout of per-image activations of ``shape`` in a network taking images of ``size``; None
    when they are not a feature map. ``token_channels``: the channel counts a transformer's residual
    stream has (tokens of other widths, e.g. q/k/v together, are not feature maps); None for a network
    without tokens, where any (C, H, W) with H, W > 1 is a feature map (padded maps included)."""
    if shape is None or any(d is None for d in shape):
        return None
    grids = image_grids(size)
    if len(shape) == 3:
        # (C, H, W) where (H, W) is one of the image's grids; else (H, W, C) where (H, W) is, whatever
        # its width (NHWC exports keep whole stretches channels-last: tf2onnx, ConvNeXt's norms); else,
        # in a network without tokens, (C, H, W) still (maps padded before a convolution)
        if (shape[1], shape[2]) in grids and shape[1] > 1 and shape[2] > 1:
            return FeatureLayout("CHW", shape[0], (shape[1], shape[2]))
        if (shape[0], shape[1]) in grids and shape[0] > 1 and shape[1] > 1:
            return FeatureLayout("HWC", shape[2], (shape[0], shape[1]))
        if token_channels is None and shape[1] > 1 and shape[2] > 1:
            return FeatureLayout("CHW", shape[0], (shape[1], shape[2]))
        return None
    if len(shape) == 2:
        t, c = shape
        if token_channels is not None and c not in token_channels:
            return None
        for prefix in range(MAX_PREFIX + 1):
            n = t - prefix
            for h, w in sorted(grids, reverse=True):
                if h * w == n and h > 1 and w > 1 and _square_like(h, w, size):
                    return FeatureLayout("tokens", c, (h, w), prefix)
    return None


def _square_like(h: int, w: int, size: tuple[int, int]) -> bool:
    """Whether an h x w grid has the image's aspect ratio (tokens carry no grid of their own)."""
    return abs(h / w - size[0] / size[1]) <= 0.25 * size[0] / size[1]
