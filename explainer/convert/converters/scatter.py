"""ScatterND and ScatterElements at every version (11, 13, 16, 18), with their ``reduction`` (16: none,
add, mul; 18: max and min too). onnx2torch has no ScatterElements, met in the dynamo exports of Hugging
Face BEiT and Data2Vec-vision (a ``select_scatter`` of the class token); its ScatterND indexes with a
list of index lists, which torch deprecates (a UserWarning on every call; an error or another result
once torch reads such a list as one tensor index), and refuses every reduction but none.

The first ``k = indices.shape[-1]`` dimensions of the data are flattened into one, each index tuple
becomes a position along it (negative indices counted from the end), and the updates are scattered
there with ``scatter`` / ``scatter_reduce``: differentiable with respect to the data and the updates,
every size read from the tensors at run time (indices and updates may carry the batch)."""
from __future__ import annotations

import math

import torch
from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

from . import register

#: the reductions each version defines, and the ``scatter_reduce`` mode computing each
REDUCTIONS = {11: ("none",), 13: ("none",), 16: ("none", "add", "mul"), 18: ("none", "add", "mul", "max", "min")}
_TORCH = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


class ScatterND(torch.nn.Module):
    """ONNX ScatterND: a copy of ``data`` with ``updates`` written (or combined, by ``reduction``) at
    the index tuples of ``indices``' last dimension."""

    def __init__(self, reduction: str = "none"):
        super().__init__()
        self.reduction = reduction

    def forward(self, data, indices, updates):
        k = indices.shape[-1]
        lead, rest = data.shape[:k], data.shape[k:]
        count = math.prod(indices.shape[:-1])
        sizes = torch.tensor(lead, dtype=torch.int64, device=data.device)
        strides = torch.tensor([math.prod(lead[j + 1:]) for j in range(k)], dtype=torch.int64, device=data.device)
        index = indices.reshape(count, k).to(torch.int64)
        index = torch.where(index < 0, index + sizes, index)
        position = (index * strides).sum(-1)  # (count,) along the flattened first k dimensions
        flat = data.reshape(math.prod(lead), *rest)
        values = updates.reshape(count, *rest).to(data.dtype)
        position = position.reshape(count, *[1] * len(rest)).expand(values.shape)
        if self.reduction == "none":
            out = flat.scatter(0, position, values)
        else:
            out = flat.scatter_reduce(0, position, values, _TORCH[self.reduction], include_self=True)
        return out.reshape(data.shape)


def _converter(op: str, version: int, module):
    """The converter of ``op`` ``version``: its ``reduction`` checked against the version's, then
    ``module(reduction, attributes)``."""
    def convert(node, graph):
        reduction = node.attributes.get("reduction", "none")
        if isinstance(reduction, bytes):
            reduction = reduction.decode()
        if reduction not in REDUCTIONS[version]:
            raise NotImplementedError(f"{op}-{version} with reduction={reduction!r} has no converter")
        return OperationConverterResult(torch_module=module(reduction, node.attributes),
                                        onnx_mapping=onnx_mapping_from_node(node))

    return convert


for _version in (11, 13, 16):
    register("ScatterND", _version, replaces="it indexes with a list of index lists, which torch deprecates (a "
             "warning on every call), and refuses the reductions")(
        _converter("ScatterND", _version, lambda reduction, attributes: ScatterND(reduction)))
register("ScatterND", 18)(_converter("ScatterND", 18, lambda reduction, attributes: ScatterND(reduction)))


class ScatterElements(torch.nn.Module):
    """ONNX ScatterElements: a copy of ``data`` with each of ``updates`` written (or combined, by
    ``reduction``) where ``indices`` (same shape as the updates, negative ones counted from the end)
    points along ``axis``, at its own position along the others; ``scatter`` / ``scatter_reduce``."""

    def __init__(self, axis: int, reduction: str = "none"):
        super().__init__()
        self.axis, self.reduction = axis, reduction

    def forward(self, data, indices, updates):
        axis = self.axis % data.dim()
        index = indices.to(torch.int64)
        index = torch.where(index < 0, index + data.shape[axis], index)
        values = updates.to(data.dtype)
        if self.reduction == "none":
            return data.scatter(axis, index, values)
        return data.scatter_reduce(axis, index, values, _TORCH[self.reduction], include_self=True)


for _version in (11, 13, 16, 18):
    register("ScatterElements", _version)(_converter(
        "ScatterElements", _version,
        lambda reduction, attributes: ScatterElements(int(attributes.get("axis", 0)), reduction)))
