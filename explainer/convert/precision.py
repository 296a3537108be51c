"""Half-precision graphs run in float32 on the torch side: gradients of an fp16 module on the CPU are
slow or missing, and float32 holds every fp16 value exactly, so the converted module computes the same
function with less rounding (it is checked against onnxruntime's fp16 run at fp16 tolerance)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .passes import register

HALF = onnx.TensorProto.FLOAT16
FLOAT = onnx.TensorProto.FLOAT


def is_half(model: onnx.ModelProto) -> bool:
    """Whether any weight, input, output or cast of the graph is float16."""
    g = model.graph
    if any(t.data_type == HALF for t in g.initializer):
        return True
    if any(vi.type.tensor_type.elem_type == HALF for vi in list(g.input) + list(g.output)):
        return True
    return any(n.op_type == "Cast" and any(a.name == "to" and a.i == HALF for a in n.attribute) for n in g.node)


def _to_float(t: onnx.TensorProto) -> None:
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))


@register("float16-as-float32", targets=("torch",), order=3)
def float16_as_float32(model: onnx.ModelProto, ctx) -> int:
    g = model.graph
    changed = 0
    for t in g.initializer:
        if t.data_type == HALF:
            _to_float(t)
            changed += 1
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.tensor_type.elem_type == HALF:
            vi.type.tensor_type.elem_type = FLOAT
            changed += 1
    for node in g.node:
        for a in node.attribute:
            if a.name == "to" and node.op_type == "Cast" and a.i == HALF:
                a.i = FLOAT
                changed += 1
            elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type == HALF:
                _to_float(a.t)
                changed += 1
    return changed
