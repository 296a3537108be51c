"""Quantized graphs on the torch side: weights stored as integers behind ``DequantizeLinear`` become
the float weights they stand for, so that onnx2torch's Conv, Gemm and MatMul converters (which read
their weights from initializers) convert them. The activations' Q/DQ pairs stay: their converters
(``converters/quantization.py``) reproduce the rounding and give straight-through gradients."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..graph import attribute, producers
from .constants import drop_unused_initializers
from .passes import register

QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger",
                 "QLinearConv", "QLinearMatMul"}


def is_quantized(model: onnx.ModelProto) -> bool:
    """Whether the graph computes with integer quantisation (its scores then differ from a float
    evaluation of the same ops by up to a few quantisation steps)."""
    return any(node.op_type in QUANTIZED_OPS for node in model.graph.node)


def before_quantisation(graph: onnx.GraphProto, tensor: str) -> str:
    """The float tensor a QuantizeLinear -> DequantizeLinear pair rounds into ``tensor``; ``tensor``
    itself when no such pair makes it."""
    made_by = producers(graph)
    dequantize = made_by.get(tensor)
    if dequantize is not None and dequantize.op_type == "DequantizeLinear":
        quantize = made_by.get(dequantize.input[0])
        if quantize is not None and quantize.op_type == "QuantizeLinear":
            return quantize.input[0]
    return tensor


def output_quantisation_step(model: onnx.ModelProto, tensor: str) -> float:
    """The quantisation step of ``tensor`` when a DequantizeLinear with a constant per-tensor scale
    makes it (quantized scores), else 0."""
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.output[0] == tensor:
            scale = next((t for t in model.graph.initializer if t.name == node.input[1]), None)
            if scale is not None:
                value = numpy_helper.to_array(scale)
                return float(value) if value.size == 1 else 0.0
    return 0.0


@register("dequantize-weights", targets=("torch",), order=6)
def dequantize_weights(model: onnx.ModelProto, ctx) -> int:
    g = model.graph
    tensors = {t.name: t for t in g.initializer}
    keep, changed = [], 0
    for node in g.node:
        inputs = [i for i in node.input if i]
        if (node.op_type != "DequantizeLinear" or not all(i in tensors for i in inputs)
                or attribute(node, "block_size", 0)):
            keep.append(node)
            continue
        g.initializer.append(numpy_helper.from_array(_dequantize(node, [tensors[i] for i in inputs]), node.output[0]))
        changed += 1
    if changed:
        del g.node[:]
        g.node.extend(keep)
        drop_unused_initializers(g)
    return changed


def _dequantize(node, tensors) -> np.ndarray:
    """(x - zero point) x scale, per tensor or along the node's axis, in the scale's float type."""
    x, scale, *zero_point = [numpy_helper.to_array(t) for t in tensors]
    axis = attribute(node, "axis", 1)
    values = x.astype(np.float64) if x.dtype != np.float64 else x

    def along_axis(p):
        if p.size == 1:
            return p.reshape(())
        shape = [1] * x.ndim
        shape[axis % x.ndim] = p.size
        return p.reshape(shape)

    if zero_point:
        values = values - along_axis(zero_point[0].astype(np.float64))
    # the product in the scale's type, as onnxruntime computes it
    return (values.astype(scale.dtype) * along_axis(scale)).astype(scale.dtype)
