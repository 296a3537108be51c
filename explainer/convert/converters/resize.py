"""ONNX Resize, exactly: every coordinate transformation and nearest rounding onnxruntime implements
(onnx2torch maps every mode to torch's ``interpolate`` and only warns that nearest with ONNX's default
``half_pixel`` / ``round_prefer_floor``, or linear with ``asymmetric``, computes something else).

Resizing is separable: each axis whose size changes is resampled in turn, gathering 1 (nearest), 2
(linear) or 4 (cubic) neighbours with onnxruntime's coordinates and weights, computed in float32 as it
computes them. Where torch's ``interpolate`` is that same function (linear and cubic with
``half_pixel`` or ``align_corners`` on the spatial axes) it is used instead."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from onnx2torch.utils.common import OnnxMapping, OperationConverterResult

from . import register

COORDINATE_MODES = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_half_pixel_for_nn")
NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")
_INTERPOLATE = {("linear", 3): "linear", ("linear", 4): "bilinear", ("linear", 5): "trilinear",
                ("cubic", 4): "bicubic"}


class Resize(torch.nn.Module):
    def __init__(self, mode: str, coordinates: str, nearest: str, cubic_a: float, exclude_outside: bool):
        super().__init__()
        self.mode, self.coordinates, self.nearest = mode, coordinates, nearest
        self.cubic_a, self.exclude_outside = cubic_a, exclude_outside

    def forward(self, x, roi=None, scales=None, sizes=None):
        if sizes is not None and sizes.numel():
            out = [int(v) for v in sizes.reshape(-1).tolist()]
            factors = [o / i for o, i in zip(out, x.shape)]
            given = None
        else:
            given = [float(v) for v in scales.reshape(-1).tolist()]
            factors = given
            out = [int(math.floor(i * s)) for i, s in zip(x.shape, given)]
        # onnxruntime leaves axes of scale 1 as they are, whatever the coordinate transformation
        changed = [a for a in range(x.dim()) if out[a] != x.shape[a] or factors[a] != 1.0]
        fast = self._interpolate(x, changed, out, given)
        if fast is not None:
            return fast
        for axis in changed:
            x = self._resample(x, axis, out[axis], factors[axis])
        return x

    def _interpolate(self, x, changed, out, given):
        """torch's interpolate where it computes what onnxruntime does, else None."""
        mode = _INTERPOLATE.get((self.mode, x.dim()))
        if mode is None or not changed or min(changed) < 2:
            return None
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


def _decoded(value):
    return value.decode() if isinstance(value, bytes) else value


def resize_converter(version: int):
    def convert(node, graph):
        attrs = {k: _decoded(v) for k, v in node.attributes.items()}
        mode = attrs.get("mode", "nearest")
        coordinates = attrs.get("coordinate_transformation_mode", "half_pixel" if version >= 11 else "asymmetric")
        nearest = attrs.get("nearest_mode", "round_prefer_floor") if version >= 11 else "simple"
        if mode not in ("nearest", "linear", "cubic"):
            raise NotImplementedError(f"Resize with mode={mode!r} has no converter")
        if coordinates not in COORDINATE_MODES:
            raise NotImplementedError(f"Resize with coordinate_transformation_mode={coordinates!r} has no converter")
        if nearest not in NEAREST_MODES + ("simple",):
            raise NotImplementedError(f"Resize with nearest_mode={nearest!r} has no converter")
        if attrs.get("antialias", 0) or attrs.get("axes") or attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch":
            raise NotImplementedError("Resize with antialias, axes or keep_aspect_ratio_policy has no converter")
        module = Resize(mode, coordinates, nearest, float(attrs.get("cubic_coeff_a", -0.75)),
                        bool(attrs.get("exclude_outside", 0)))
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
