"""ONNX Resize, exactly: every coordinate transformation and nearest rounding onnxruntime implements
(onnx2torch maps every mode to torch's ``interpolate`` and only warns that nearest with ONNX's default
``half_pixel`` / ``round_prefer_floor``, or linear with ``asymmetric``, computes something else).

Resizing is separable: each axis whose size changes is resampled in turn, gathering 1 (nearest), 2
(linear) or 4 (cubic) neighbours with onnxruntime's coordinates and weights, computed in float32 as it
computes them. Where torch's ``interpolate`` is that same function (linear and cubic with
``half_pixel`` or ``align_corners`` on the spatial axes) it is used instead.

Resize-18 and later: ``antialias=1`` (linear and cubic; the spec ignores it for nearest) is onnxruntime's
Pillow-style filter: per output index a window of the input around its centre, the kernel stretched by
the shrinking factor, weights normalised to sum 1 and those falling outside the input moved to the
border (``exclude_outside=0``) or dropped (``exclude_outside=1``); applied as an (output, input) matrix
per axis. ``axes`` (scales or sizes of the listed axes only), ``keep_aspect_ratio_policy``
(``not_larger`` / ``not_smaller``: one scale for the listed axes, the sizes rounded) and the
``half_pixel_symmetric`` coordinates of Resize-19 as onnxruntime computes them."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from onnx2torch.utils.common import OnnxMapping, OperationConverterResult

from . import decoded_attributes, register

COORDINATE_MODES = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_half_pixel_for_nn",
                    "half_pixel_symmetric")
POLICIES = ("stretch", "not_larger", "not_smaller")
NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")
_INTERPOLATE = {("linear", 3): "linear", ("linear", 4): "bilinear", ("linear", 5): "trilinear",
                ("cubic", 4): "bicubic"}


class Resize(torch.nn.Module):
    def __init__(self, mode: str, coordinates: str, nearest: str, cubic_a: float, exclude_outside: bool,
                 antialias: bool = False, axes: tuple[int, ...] = (), policy: str = "stretch"):
        super().__init__()
        self.mode, self.coordinates, self.nearest = mode, coordinates, nearest
        self.cubic_a, self.exclude_outside = cubic_a, exclude_outside
        self.antialias, self.axes, self.policy = antialias and mode != "nearest", axes, policy
        self._matrices: dict[tuple, torch.Tensor] = {}

    def forward(self, x, roi=None, scales=None, sizes=None):
        out, factors, given = self._plan(list(x.shape), scales, sizes)
        if out == list(x.shape):  # onnxruntime copies the input whatever the scales
            return x
        if self.antialias:  # onnxruntime copies an axis whose size stays, whatever its scale
            for axis in range(x.dim()):
                if out[axis] != x.shape[axis]:
                    x = self._filter(x, axis, out[axis], factors[axis])
            return x
        # onnxruntime leaves axes of scale 1 as they are, whatever the coordinate transformation
        changed = [a for a in range(x.dim()) if out[a] != x.shape[a] or factors[a] != 1.0]
        fast = self._interpolate(x, changed, out, given)
        if fast is not None:
            return fast
        for axis in changed:
            x = self._resample(x, axis, out[axis], factors[axis])
        return x

    def _plan(self, shape: list[int], scales, sizes) -> tuple[list[int], list[float], list[float] | None]:
        """(output sizes, per-axis scale factors as float32 values, the given scales or None), as
        onnxruntime derives them from ``scales`` or ``sizes``, ``axes`` and the aspect-ratio policy."""
        rank = len(shape)
        axes = [a % rank for a in self.axes] or list(range(rank))
        f32 = np.float32
        if sizes is not None and sizes.numel():
            out = list(shape)
            for a, v in zip(axes, sizes.reshape(-1).tolist()):
                out[a] = int(v)
            factors = [float(f32(o) / f32(i)) if i else 1.0 for o, i in zip(out, shape)]
            if self.policy != "stretch":
                pick = min if self.policy == "not_larger" else max
                chosen = pick(factors[a] for a in axes)
                factors = [chosen if a in axes else 1.0 for a in range(rank)]
                out = [int(np.floor(abs(f32(chosen) * f32(i)) + 0.5)) if a in axes else i  # std::round
                       for a, i in enumerate(shape)]
            return out, factors, None
        factors = [1.0] * rank
        for a, v in zip(axes, scales.reshape(-1).tolist()):
            factors[a] = float(v)
        out = [int(f32(s) * f32(i)) for i, s in zip(shape, factors)]
        return out, factors, factors

    def _interpolate(self, x, changed, out, given):
        """torch's interpolate where it computes what onnxruntime does, else None."""
        mode = _INTERPOLATE.get((self.mode, x.dim()))
        if mode is None or not changed or min(changed) < 2:
            return None
        if any(out[a] == x.shape[a] for a in changed) or self.policy != "stretch":
            return None  # torch copies an axis whose size stays, and scales by the sizes, not the policy's scale
        spatial = out[2:]
        if self.coordinates == "align_corners":
            align = True
        elif self.coordinates == "half_pixel" or (self.coordinates == "pytorch_half_pixel" and min(spatial) > 1):
            align = False
        else:
            return None
        if self.mode == "cubic" and (self.cubic_a != -0.75 or self.exclude_outside):
            return None
        if given is None or align:
            return F.interpolate(x, size=spatial, mode=mode, align_corners=align)
        return F.interpolate(x, scale_factor=given[2:], mode=mode, align_corners=align, recompute_scale_factor=False)

    def _source(self, length: int, size: int, factor: float, device) -> torch.Tensor:
        """Each output index's coordinate in the input, in float32 as onnxruntime computes it."""
        d = torch.arange(size, dtype=torch.float32, device=device)
        scale = torch.tensor(factor, dtype=torch.float32)
        if self.coordinates == "half_pixel_symmetric":  # float32 steps, then the last ones in double
            adjustment = torch.tensor(size, dtype=torch.float32) / (scale * length)
            offset = (torch.tensor(length / 2, dtype=torch.float32) * (1 - adjustment)).double()
            return (offset + (d.double() + 0.5) / scale.double() - 0.5).float()
        if self.coordinates == "half_pixel" or (self.coordinates == "pytorch_half_pixel" and size > 1):
            return (d + 0.5) / scale - 0.5
        if self.coordinates == "pytorch_half_pixel":
            return torch.zeros_like(d)
        if self.coordinates == "align_corners":
            return d * (length - 1) / (size - 1) if size > 1 else torch.zeros_like(d)
        if self.coordinates == "asymmetric":
            return d / scale
        return (d + 0.5) / scale  # tf_half_pixel_for_nn

    def _resample(self, x, axis: int, size: int, factor: float):
        length = x.shape[axis]
        src = self._source(length, size, factor, x.device)
        if self.mode == "nearest":
            index = {"round_prefer_floor": torch.ceil(src - 0.5), "round_prefer_ceil": torch.floor(src + 0.5),
                     "floor": torch.floor(src), "ceil": torch.ceil(src),
                     # Resize-10: onnxruntime rounds up when shrinking, down when enlarging
                     "simple": torch.ceil(src) if factor < 1 else torch.floor(src)}[self.nearest]
            return x.index_select(axis, index.clamp(0, length - 1).long())
        if self.mode == "linear":
            src = src.clamp(0, length - 1)
            low = src.floor().clamp(max=length - 1)
            taps, weights = [low, (low + 1).clamp(max=length - 1)], [1 - (src - low), src - low]
        else:
            low = src.floor()
            t = src - low
            a = self.cubic_a
            taps = [low - 1, low, low + 1, low + 2]
            weights = [((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
                       ((a + 2) * t - (a + 3)) * t * t + 1,
                       ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
                       ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a]
            if self.exclude_outside:
                weights = [w * ((i >= 0) & (i <= length - 1)) for w, i in zip(weights, taps)]
                total = sum(weights)
                weights = [w / total for w in weights]
        shape = [1] * x.dim()
        shape[axis] = size
        result = 0
        for index, weight in zip(taps, weights):
            picked = x.index_select(axis, index.clamp(0, length - 1).long())
            result = result + picked * weight.to(x.dtype).reshape(shape)
        return result


    def _filter(self, x, axis: int, size: int, factor: float):
        """``x`` resampled along ``axis`` to ``size`` by the antialiasing filter: one matrix product."""
        key = (x.shape[axis], size, factor, x.dtype, x.device)
        if key not in self._matrices:
            self._matrices[key] = torch.from_numpy(self._weights(x.shape[axis], size, factor)).to(x.device, x.dtype)
        return torch.movedim(torch.movedim(x, axis, -1) @ self._matrices[key].T, -1, axis)

    def _weights(self, length: int, size: int, factor: float) -> np.ndarray:
        """The (size, length) float32 matrix of onnxruntime's antialiasing filter along one axis."""
        f32 = np.float32
        scale = f32(1) / f32(factor)  # input pixels per output pixel
        support = f32(2 if self.mode == "linear" else 4) * f32(0.5)
        if scale >= 1:
            support = support * scale
        window = int(math.ceil(support)) * 2 + 1
        if scale == 1:
            centre = np.arange(size, dtype=f32) + f32(0.5)
        else:
            centre = self._source(length, size, factor, "cpu").numpy() + f32(0.5)
        low = np.floor(centre - support + f32(0.5)).astype(np.int64)
        high = low + np.clip(np.floor(centre + support + f32(0.5)).astype(np.int64) - low, 0, window)
        low_cut, high_cut = np.clip(low, 0, length), np.clip(high, 0, length)
        if self.exclude_outside:
            low, high = low_cut, high_cut
        taps = low[:, None] + np.arange(window)[None, :]
        inside = taps < high[:, None]
        t = np.abs((taps.astype(f32) - centre[:, None] + f32(0.5)) * (f32(1) / scale if scale >= 1 else f32(1)))
        if self.mode == "linear":
            w = np.where(t < 1, f32(1) - t, f32(0))
        else:
            a = f32(self.cubic_a)
            w = np.where(t < 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                         np.where(t < 2, (((t - 5) * t + 8) * t - 4) * a, f32(0)))
        w = np.where(inside, w, f32(0)).astype(f32)
        total = w.sum(axis=1, dtype=f32)
        w *= np.where(total == 0, f32(1), f32(1) / np.where(total == 0, f32(1), total))[:, None]
        w[high_cut <= low_cut] = 0  # a window wholly outside the input: onnxruntime writes 0 there
        matrix = np.zeros((size, length), f32)
        rows = np.broadcast_to(np.arange(size)[:, None], taps.shape)
        np.add.at(matrix, (rows[inside], np.clip(taps, 0, length - 1)[inside]), w[inside])  # outside: to the border
        return matrix


def resize_converter(version: int):
    def convert(node, graph):
        attrs = decoded_attributes(node)
        mode = attrs.get("mode", "nearest")
        coordinates = attrs.get("coordinate_transformation_mode", "half_pixel" if version >= 11 else "asymmetric")
        nearest = attrs.get("nearest_mode", "round_prefer_floor") if version >= 11 else "simple"
        if mode not in ("nearest", "linear", "cubic"):
            raise NotImplementedError(f"Resize with mode={mode!r} has no converter")
        if coordinates not in COORDINATE_MODES:
            raise NotImplementedError(f"Resize with coordinate_transformation_mode={coordinates!r} has no converter")
        if nearest not in NEAREST_MODES + ("simple",):
            raise NotImplementedError(f"Resize with nearest_mode={nearest!r} has no converter")
        policy = attrs.get("keep_aspect_ratio_policy", "stretch")
        if policy not in POLICIES:
            raise NotImplementedError(f"Resize with keep_aspect_ratio_policy={policy!r} has no converter")
        module = Resize(mode, coordinates, nearest, float(attrs.get("cubic_coeff_a", -0.75)),
                        bool(attrs.get("exclude_outside", 0)), antialias=bool(attrs.get("antialias", 0)),
                        axes=tuple(int(a) for a in attrs.get("axes", ())), policy=policy)
        inputs = list(node.input_values)
        if version == 10:  # (X, scales)
            inputs = [inputs[0], "", inputs[1]]
        while inputs and not inputs[-1]:
            inputs.pop()
        return OperationConverterResult(torch_module=module,
                                        onnx_mapping=OnnxMapping(inputs=tuple(inputs), outputs=node.output_values))

    return convert


for _version in (10, 11, 13):
    register("Resize", _version, replaces="it maps every coordinate transformation to torch's interpolate, "
             "which computes another function for most of them")(resize_converter(_version))
for _version in (18, 19):
    register("Resize", _version)(resize_converter(_version))
