"""Reductions: from opset 18 on ``axes`` is an input (constant in every exported classifier; a computed
one is refused); and ReduceMax/ReduceMin/ReduceProd of every version, which onnx2torch reduces one axis
at a time, shifting negative axes wrongly once ``keepdims=0`` has removed one (axes [-2, -1] of a
rank-4 tensor gave the maximum over axes 2 and 2)."""
from __future__ import annotations

import torch
from onnx2torch.utils.common import OnnxMapping, OperationConverterResult, get_const_value

from . import register

REDUCTIONS = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
              "ReduceLogSumExp", "ReduceSumSquare")


def _prod(x, axes, keepdim):
    for axis in reversed(axes):  # the highest first: the lower ones keep their place
        x = x.prod(axis, keepdim=keepdim)
    return x


_FUNCTIONS = {
    "ReduceMean": lambda x, axes, keep: x.mean(axes, keepdim=keep),
    "ReduceSum": lambda x, axes, keep: x.sum(axes, keepdim=keep),
    "ReduceMax": lambda x, axes, keep: x.amax(axes, keepdim=keep),
    "ReduceMin": lambda x, axes, keep: x.amin(axes, keepdim=keep),
    "ReduceProd": _prod,
    "ReduceL1": lambda x, axes, keep: x.abs().sum(axes, keepdim=keep),
    "ReduceL2": lambda x, axes, keep: x.square().sum(axes, keepdim=keep).sqrt(),
    "ReduceLogSum": lambda x, axes, keep: x.sum(axes, keepdim=keep).log(),
    "ReduceLogSumExp": lambda x, axes, keep: torch.logsumexp(x, axes, keepdim=keep),
    "ReduceSumSquare": lambda x, axes, keep: x.square().sum(axes, keepdim=keep),
}


class Reduce(torch.nn.Module):
    """An ONNX reduction over constant axes (every axis where none are given), negative ones counted
    from the input's rank."""

    def __init__(self, op: str, axes: list[int] | None, keepdims: bool):
        super().__init__()
        self.op, self.axes, self.keepdims = op, axes, keepdims

    def forward(self, x):
        axes = sorted({a % x.dim() for a in self.axes}) if self.axes else list(range(x.dim()))
        return _FUNCTIONS[self.op](x, axes, self.keepdims)


class Keep(torch.nn.Module):
    """A reduction over no axes with ``noop_with_empty_axes=1``: the input as it is."""

    def forward(self, x):
        return x


def convert(node, graph):
    keepdims = bool(node.attributes.get("keepdims", 1))
    axes = node.attributes.get("axes")
    if len(node.input_values) > 1 and node.input_values[1]:
        try:
            axes = [int(a) for a in get_const_value(node.input_values[1], graph).reshape(-1).tolist()]
        except KeyError:
            raise NotImplementedError(f"{node.operation_type} with axes computed at run time has no "
                                      "converter") from None
    mapping = OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values)
    if not axes and node.attributes.get("noop_with_empty_axes", 0):
        return OperationConverterResult(torch_module=Keep(), onnx_mapping=mapping)
    return OperationConverterResult(torch_module=Reduce(node.operation_type, list(axes) if axes else None, keepdims),
                                    onnx_mapping=mapping)


for _op in REDUCTIONS:
    register(_op, 18)(convert)
for _op in ("ReduceMax", "ReduceMin"):  # opset 20 added boolean inputs
    register(_op, 20)(convert)
for _op, _versions in (("ReduceMax", (1, 11, 12, 13)), ("ReduceMin", (1, 11, 12, 13)), ("ReduceProd", (1, 11, 13))):
    for _version in _versions:
        register(_op, _version, replaces="with keepdims=0 it shifts negative axes after removing one")(convert)
