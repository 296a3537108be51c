"""Reductions from opset 18 on, where ``axes`` moved from an attribute to an input (constant in every
exported classifier; a computed one is refused)."""
from __future__ import annotations

import torch
from onnx2torch.node_converters.reduce import OnnxReduceStaticAxes
from onnx2torch.utils.common import OnnxMapping, OperationConverterResult, get_const_value

from . import register

REDUCTIONS = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
              "ReduceLogSumExp", "ReduceSumSquare")


class Keep(torch.nn.Module):
    """A reduction over no axes with ``noop_with_empty_axes=1``: the input as it is."""

    def forward(self, x):
        return x


def convert(node, graph):
    keepdims = node.attributes.get("keepdims", 1)
    axes = None
    if len(node.input_values) > 1 and node.input_values[1]:
        try:
            axes = [int(a) for a in get_const_value(node.input_values[1], graph).reshape(-1).tolist()]
        except KeyError:
            raise NotImplementedError(f"{node.operation_type} with axes computed at run time has no "
                                      "converter") from None
    mapping = OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values)
    if not axes and node.attributes.get("noop_with_empty_axes", 0):
        return OperationConverterResult(torch_module=Keep(), onnx_mapping=mapping)
    module = OnnxReduceStaticAxes(operation_type=node.operation_type, axes=axes or None, keepdims=keepdims)
    return OperationConverterResult(torch_module=module, onnx_mapping=mapping)


for _op in REDUCTIONS:
    register(_op, 18)(convert)
for _op in ("ReduceMax", "ReduceMin"):  # opset 20 added boolean inputs
    register(_op, 20)(convert)
