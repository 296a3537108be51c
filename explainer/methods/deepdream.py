"""Deep dream (MATLAB's ``deepDreamImage``) on the converted module: images that strongly activate
chosen channels of any named layer, including the class scores.

Algorithm, as MATLAB's: gradient ascent on the mean activation of each channel, over an image pyramid
(the image is optimised at ``pyramid_levels`` sizes, each ``pyramid_scale`` times the last, ending at
the network's input size; coarse levels give large-scale structure, fine levels detail), with steps
normalised by the gradient's mean magnitude. All channels are optimised together as one batch. As in
the classic algorithm, the network runs at each level's own size where the graph allows it (fully
convolutional, with a global pool); other graphs see each level resized up to their input size.

Optional regularisation beyond MATLAB, all off by default (as in Lucid's transformation robustness):
``jitter`` (random shift of up to N pixels before each step), ``blur`` (Gaussian sigma applied to the
image after each step), ``tv_weight`` (total-variation penalty on the image).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .. import progress
from ..errors import InvalidParameterError, InvalidParameterTypeError
from ..runtime.torch_engine import torch_engine
from ..validation import check_choice, check_float, check_int
from .registry import public

if TYPE_CHECKING:
    from ..runtime.classifier import Classifier

SCALINGS = ("linear", "none")
STEP = 2.0  # pixels (0..255) per iteration, times the normalised gradient
#: the gradient's mean |value| is floored here before it divides the step: a layer whose gradient is
#: float32 noise (below it) moves the image less than STEP, rather than by amplified noise
GRADIENT_FLOOR = 1e-12


def _channels(net: Classifier, layer_name: str, channels, is_scores: bool) -> list[int]:
    if isinstance(channels, (int, np.integer, str)):
        channels = [channels]
    if not isinstance(channels, (list, tuple, np.ndarray)) or len(channels) == 0:
        raise InvalidParameterTypeError(
            f"deep_dream_image: channels must be a channel index, a class name or a non-empty list; got {channels!r}.")
    out = []
    for c in channels:
        if isinstance(c, str):
            if not is_scores:
                raise InvalidParameterError(
                    f"deep_dream_image: class names are allowed only for the class-score layer; layer "
                    f"{layer_name!r} takes channel indices.")
            out.append(net.class_index(c, "deep_dream_image: channels"))
        else:
            out.append(check_int("deep_dream_image", "channels", c, minimum=0))
    return out


@public
def deep_dream_image(net: Classifier, layer, channels, *, num_iterations=10, pyramid_levels=3, pyramid_scale=1.4,
                     output_scaling="linear", initial_image=None, random_state=None, verbose=True,
                     jitter=0, blur=0.0, tv_weight=0.0):
    """(K, H, W, C) images, one per channel, at the network's input size. With
    ``output_scaling="linear"`` each image is rescaled to [0, 1]; ``"none"`` returns pixel values
    (0..255, clipped)."""
    import torch
    import torch.nn.functional as F

    where = "deep_dream_image"
    num_iterations = check_int(where, "num_iterations", num_iterations, minimum=1, maximum=100_000)
    pyramid_levels = check_int(where, "pyramid_levels", pyramid_levels, minimum=1, maximum=20)
    pyramid_scale = check_float(where, "pyramid_scale", pyramid_scale, minimum=1.0, maximum=10.0)
    check_choice(where, "output_scaling", output_scaling, SCALINGS)
    jitter = check_int(where, "jitter", jitter, minimum=0, maximum=1000)
    blur = check_float(where, "blur", blur, minimum=0.0, maximum=100.0)
    tv_weight = check_float(where, "tv_weight", tv_weight, minimum=0.0)
    if random_state is not None and not isinstance(random_state, (int, np.integer)):
        raise InvalidParameterTypeError(f"{where}: random_state must be None or an integer; got {random_state!r}.")
    engine = torch_engine(net)
    target = net.layer(layer)
    scores_layer = net.layer(net.gradient_scores)
    is_scores = target.output in (scores_layer.output, net.output.name)
    chans = _channels(net, layer, channels, is_scores)
    layout = None if is_scores else net.feature_map_layout(target, where)
    k = len(chans)
    h, w = net.input.size
    c = 3 if net.input.channels == 3 else 1
    rng = np.random.default_rng(random_state)
    if initial_image is None:
        start = 128.0 + 20.0 * rng.standard_normal((h, w, c))
    else:
        from ..io import to_pixels
        from ..model.preprocess import resize

        start = resize(to_pixels(initial_image, "initial_image"), (h, w))
        if start.shape[2] != c:
            start = np.repeat(start, c, axis=2) if start.shape[2] == 1 else start.mean(axis=2, keepdims=True)
    x = engine.tensor(np.clip(start, 0, 255)).permute(2, 0, 1)[None].repeat(k, 1, 1, 1)
    sizes = [(max(8, round(h / pyramid_scale ** (pyramid_levels - 1 - lvl))),
              max(8, round(w / pyramid_scale ** (pyramid_levels - 1 - lvl)))) for lvl in range(pyramid_levels)]
    idx = torch.arange(k, device=x.device)
    chan_t = torch.as_tensor(chans, device=x.device)
    gen = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))
    bar = progress.bar(total=len(sizes) * num_iterations, desc="deep dream", verbose=verbose)
    for level, size in enumerate(sizes):
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False).clamp(0, 255)
        # the classic algorithm runs the network at each level's own size (a quarter of the work at
        # half the side); graphs that only run at their input size see the level resized up to it
        own_size = size != (h, w)
        if own_size and size not in engine.runs_at_size:
            engine.runs_at_size[size] = _runs_at(engine, x, target.name, layout)
        own_size = own_size and engine.runs_at_size[size]
        for it in range(num_iterations):
            xi = x.detach().requires_grad_(True)
            shifted = xi
            if jitter:
                dy, dx = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=gen))
                shifted = torch.roll(xi, shifts=(dy, dx), dims=(2, 3))
            with torch.enable_grad(), engine.capture([target.name]) as captured:
                _forward(engine.pixel_model, shifted, own_size)
                acts = _chw(captured[target.name], layout)
                if int(chan_t.max()) >= acts.shape[1]:
                    raise InvalidParameterError(
                        f"{where}: layer {layer!r} has {acts.shape[1]} channels; channel {int(chan_t.max())} "
                        "is out of range.")
                strength = acts[idx, chan_t].reshape(k, -1).mean(dim=1)
                objective = strength.sum()
                if tv_weight:
                    tv = (xi[:, :, 1:] - xi[:, :, :-1]).abs().mean() + (xi[:, :, :, 1:] - xi[:, :, :, :-1]).abs().mean()
                    objective = objective - tv_weight * tv * k
                grad = torch.autograd.grad(objective, xi)[0]
            scale = grad.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(GRADIENT_FLOOR)
            x = (x + STEP * grad / scale).clamp(0, 255)
            if blur:
                x = _gaussian_blur(x, blur)
            # MATLAB prints a table of these; a bar's note keeps them on one line
            bar.set_postfix_str(f"level {level + 1}/{len(sizes)}, activation strength "
                                f"{float(strength.detach().mean()):.2f}", refresh=False)
            bar.update()
    bar.close()
    out = x.detach().permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)
    if output_scaling == "linear":
        for i in range(k):
            lo, hi = out[i].min(), out[i].max()
            out[i] = (out[i] - lo) / (hi - lo) if hi > lo else 0.0
    return out


def _forward(pixel_model, pixels, native_size: bool):
    """Scores of ``pixels``, run channels-last (oneDNN's faster layout: deep dream's steps take about
    0.8x the time, and its images need no bit-exact agreement with the other methods' layout)."""
    import torch

    x = pixel_model.model_input(pixels, native_size)
    if x.ndim == 4 and not pixel_model.nhwc:
        x = x.contiguous(memory_format=torch.channels_last)
    return pixel_model.logits(x)


def _chw(acts, layout):
    """A captured activation as (N, C, h, w)."""
    if layout is not None:
        acts = layout.to_chw(acts)
    return acts[:, :, None, None] if acts.ndim == 2 else acts


def _runs_at(engine, pixels, layer_name: str, layout) -> bool:
    """Whether the converted module runs on ``pixels`` at their own (smaller) size and gives scores
    and a ``layer_name`` activation shaped as at the input size: graphs with a flatten before a dense
    layer, fixed position embeddings or fixed reshapes fail here and are run at their input size."""
    import torch

    shapes = []
    try:
        for native_size in (True, False):
            with torch.no_grad(), engine.capture([layer_name]) as captured:
                scores = engine.pixel_model(pixels[:1].detach(), native_size=native_size)
                shapes.append((tuple(scores.shape), tuple(_chw(captured[layer_name], layout).shape[:2])))
    except Exception:  # any failure of the graph at another size means "only at its input size"
        return False
    return shapes[0] == shapes[1]


def _gaussian_blur(x, sigma: float):
    import torch
    import torch.nn.functional as F

    radius = max(1, int(round(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-(t ** 2) / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
