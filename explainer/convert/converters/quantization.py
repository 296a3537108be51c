"""Quantized graphs (onnxruntime.quantization's static QDQ and dynamic formats) as differentiable modules.

Forward: the integer arithmetic onnxruntime does, on float tensors holding the integer values
(``QuantizeLinear`` rounds half to even and saturates; ``ConvInteger``/``MatMulInteger`` accumulate
products of zero-point-shifted integers). Backward: the straight-through estimator, the convention of
quantisation-aware training: rounding passes the gradient unchanged, saturation stops it (gradient 0
outside the representable range), and the scales that ``DynamicQuantizeLinear`` computes from the
tensor's own range are treated as constants. Weights behind ``DequantizeLinear`` are dequantised once
by the ``dequantize-weights`` pass, so Conv and Gemm see float weights equal to (w - zero point) x scale.
"""
from __future__ import annotations

import onnx
import torch
import torch.nn.functional as F
from onnx2torch.utils.common import OnnxMapping, OperationConverterResult, onnx_mapping_from_node

from . import register

#: ONNX integer tensor type -> the range QuantizeLinear saturates to
INTEGER_RANGES = {
    onnx.TensorProto.UINT8: (0, 255), onnx.TensorProto.INT8: (-128, 127),
    onnx.TensorProto.UINT16: (0, 65535), onnx.TensorProto.INT16: (-32768, 32767),
    onnx.TensorProto.UINT4: (0, 15), onnx.TensorProto.INT4: (-8, 7),
}


def _broadcast(param: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """A per-axis scale or zero point shaped to broadcast against ``x`` along ``axis``."""
    if param.dim() == 0 or param.numel() == 1:
        return param.reshape(())
    shape = [1] * x.dim()
    shape[axis % x.dim()] = param.numel()
    return param.reshape(shape)


def _round_saturate(v: torch.Tensor, zero_point, low: int, high: int) -> torch.Tensor:
    """round(v) + zero point clamped to [low, high], with the straight-through gradient of v inside the
    range and 0 outside."""
    q = torch.round(v.detach())
    if zero_point is not None:
        q = q + zero_point
    inside = (q >= low) & (q <= high)
    return q.clamp(low, high) + (v - v.detach()) * inside


class QuantizeLinear(torch.nn.Module):
    """``rectifies``: the zero point is the type's minimum, so negative values saturate to 0: the
    quantizer folded a ReLU into this rounding (guided backpropagation treats it as that ReLU)."""

    def __init__(self, axis: int, low: int, high: int, rectifies: bool = False):
        super().__init__()
        self.axis, self.low, self.high, self.rectifies = axis, low, high, rectifies

    def forward(self, x, scale, zero_point=None):
        scale = _broadcast(scale.to(x.dtype), x, self.axis)
        if zero_point is not None:
            zero_point = _broadcast(zero_point.to(x.dtype), x, self.axis)
        return _round_saturate(x / scale, zero_point, self.low, self.high)


class DequantizeLinear(torch.nn.Module):
    def __init__(self, axis: int):
        super().__init__()
        self.axis = axis

    def forward(self, x, scale, zero_point=None):
        x = x.to(scale.dtype)
        if zero_point is not None:
            x = x - _broadcast(zero_point.to(scale.dtype), x, self.axis)
        return x * _broadcast(scale, x, self.axis)


class DynamicQuantizeLinear(torch.nn.Module):
    """uint8 quantisation with the scale and zero point of the tensor's own range (including 0)."""

    def forward(self, x):
        low = torch.clamp(x.detach().min(), max=0.0)
        high = torch.clamp(x.detach().max(), min=0.0)
        scale = (high - low) / 255.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero_point = torch.round(-low / safe).clamp(0, 255)
        y = _round_saturate(x / safe, zero_point, 0, 255)
        return y, scale, zero_point


class ConvInteger(torch.nn.Module):
    """Conv of (x - x zero point) with the constant (w - w zero point); onnxruntime pads with the zero
    point, which is 0 after the shift."""

    def __init__(self, weight: torch.Tensor, stride, dilation, groups: int, pads):
        super().__init__()
        self.register_buffer("weight", weight)
        self.stride, self.dilation, self.groups = stride, dilation, groups
        rank = weight.dim() - 2
        begin, end = pads[:rank], pads[rank:]
        self.symmetric = list(begin) == list(end)
        self.padding = list(begin) if self.symmetric else 0
        # F.pad takes the last axis first: (left, right, top, bottom)
        self.pad = [p for axis in reversed(range(rank)) for p in (begin[axis], end[axis])]

    def forward(self, x, x_zero_point=None):
        x = x.to(self.weight.dtype)
        if x_zero_point is not None:
            x = x - x_zero_point.to(x.dtype).reshape(())
        if not self.symmetric:
            x = F.pad(x, self.pad)
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[self.weight.dim() - 2]
        return conv(x, self.weight, None, self.stride, self.padding, self.dilation, self.groups)


class MatMulInteger(torch.nn.Module):
    """(a - a zero point) @ (b - b zero point); b's zero point per column, a's per tensor or per row."""

    def forward(self, a, b, a_zero_point=None, b_zero_point=None):
        a = a.to(torch.float32)
        b = b.to(torch.float32)
        if a_zero_point is not None:
            zp = a_zero_point.to(a.dtype)
            a = a - (zp.reshape(-1, 1) if zp.numel() > 1 else zp.reshape(()))
        if b_zero_point is not None:
            zp = b_zero_point.to(b.dtype)
            b = b - (zp.reshape(-1) if zp.numel() > 1 else zp.reshape(()))
        return torch.matmul(a, b)


def _integer_range(node, graph) -> tuple[int, int, bool]:
    """(lowest, highest integer, whether the zero point is the lowest everywhere)."""
    zero_point = node.input_values[2] if len(node.input_values) > 2 else ""
    if zero_point:
        if zero_point not in graph.initializers:
            raise NotImplementedError("QuantizeLinear with a computed zero point has no converter")
        tensor = graph.initializers[zero_point]
        dtype, values = tensor.proto.data_type, tensor.to_numpy()
    else:
        dtype, values = node.attributes.get("output_dtype", 0) or onnx.TensorProto.UINT8, None
    if dtype not in INTEGER_RANGES:
        raise NotImplementedError(f"QuantizeLinear to {onnx.TensorProto.DataType.Name(dtype)} has no converter "
                                  "(integer types only)")
    low, high = INTEGER_RANGES[dtype]
    return low, high, bool(low == 0 if values is None else (values == low).all())


def _no_blocks(node) -> None:
    if node.attributes.get("block_size", 0):
        raise NotImplementedError(f"{node.operation_type} with block_size={node.attributes['block_size']} "
                                  "(blocked quantization) has no converter")


def _quantize_linear(node, graph):
    _no_blocks(node)
    low, high, rectifies = _integer_range(node, graph)
    return OperationConverterResult(torch_module=QuantizeLinear(node.attributes.get("axis", 1), low, high, rectifies),
                                    onnx_mapping=onnx_mapping_from_node(node))


def _dequantize_linear(node, graph):
    _no_blocks(node)
    return OperationConverterResult(torch_module=DequantizeLinear(node.attributes.get("axis", 1)),
                                    onnx_mapping=onnx_mapping_from_node(node))


for _version in (10, 13, 19, 21, 23, 24, 25, 28):
    register("QuantizeLinear", _version)(_quantize_linear)
    register("DequantizeLinear", _version)(_dequantize_linear)


@register("DynamicQuantizeLinear", 11)
def _dynamic_quantize_linear(node, graph):
    return OperationConverterResult(torch_module=DynamicQuantizeLinear(), onnx_mapping=onnx_mapping_from_node(node))


@register("ConvInteger", 10)
def _conv_integer(node, graph):
    inputs = list(node.input_values) + [""] * (4 - len(node.input_values))
    x, w, x_zero_point, w_zero_point = inputs
    if w not in graph.initializers or (w_zero_point and w_zero_point not in graph.initializers):
        raise NotImplementedError("ConvInteger with computed weights has no converter")
    weight = graph.initializers[w].to_torch().to(torch.float32)
    if w_zero_point:
        zp = graph.initializers[w_zero_point].to_torch().to(torch.float32)
        weight = weight - (zp.reshape(-1, *[1] * (weight.dim() - 1)) if zp.numel() > 1 else zp.reshape(()))
    rank = weight.dim() - 2
    attrs = node.attributes
    auto_pad = attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        raise NotImplementedError(f"ConvInteger with auto_pad={auto_pad} has no converter")
    module = ConvInteger(weight, attrs.get("strides", [1] * rank), attrs.get("dilations", [1] * rank),
                         attrs.get("group", 1), attrs.get("pads", [0] * 2 * rank) if auto_pad == "NOTSET" else [0] * 2 * rank)
    mapped = (x, x_zero_point) if x_zero_point else (x,)
    return OperationConverterResult(torch_module=module, onnx_mapping=OnnxMapping(inputs=mapped,
                                                                                 outputs=node.output_values))


@register("MatMulInteger", 10)
def _matmul_integer(node, graph):
    return OperationConverterResult(torch_module=MatMulInteger(), onnx_mapping=onnx_mapping_from_node(node))
