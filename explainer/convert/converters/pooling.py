"""Pools whose spatial rank comes from the node itself (``kernel_shape``) or from the tensor at run
time, never from a shape recorded by shape inference: onnx2torch's AveragePool and MaxPool fail with
"spatial rank == -2" where inference lost the input's rank, and its GlobalAveragePool then averages
over every axis, batch and channels included (the "mat1 and mat2 shapes cannot be multiplied (1x1
and 768x1000)" of a head that follows)."""
from __future__ import annotations

import torch
from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

from . import register

_AVERAGE = {1: torch.nn.AvgPool1d, 2: torch.nn.AvgPool2d, 3: torch.nn.AvgPool3d}
_MAX = {1: torch.nn.MaxPool1d, 2: torch.nn.MaxPool2d, 3: torch.nn.MaxPool3d}


def _geometry(node) -> tuple[list, list, list]:
    """(kernel, strides, begin pads) of a pool whose pads are symmetric (the 'auto-pad' and
    'asymmetric-pool' passes make them so)."""
    kernel = list(node.attributes["kernel_shape"])
    rank = len(kernel)
    strides = list(node.attributes.get("strides", [1] * rank))
    auto_pad = node.attributes.get("auto_pad", "NOTSET")
    pads = list(node.attributes.get("pads", [0] * 2 * rank)) if auto_pad == "NOTSET" else [0] * 2 * rank
    if auto_pad not in ("NOTSET", "VALID"):
        raise NotImplementedError(f"{node.operation_type} with auto_pad={auto_pad} has no converter")
    if pads[:rank] != pads[rank:]:
        raise NotImplementedError(f"{node.operation_type} with asymmetric pads {pads} has no converter")
    if rank not in _AVERAGE:
        raise NotImplementedError(f"{node.operation_type} over {rank} spatial axes has no converter")
    return kernel, strides, pads[:rank]


def average_pool(node, graph):
    kernel, strides, pads = _geometry(node)
    if any(d != 1 for d in node.attributes.get("dilations", [1])):
        raise NotImplementedError("AveragePool with dilations has no converter")
    module = _AVERAGE[len(kernel)](kernel, strides, pads, ceil_mode=bool(node.attributes.get("ceil_mode", 0)),
                                   count_include_pad=bool(node.attributes.get("count_include_pad", 0)))
    return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))


def max_pool(node, graph):
    if len([o for o in node.output_values if o]) > 1:
        raise NotImplementedError("MaxPool with its Indices output has no converter")
    kernel, strides, pads = _geometry(node)
    module = _MAX[len(kernel)](kernel, strides, pads, dilation=list(node.attributes.get("dilations", [1] * len(kernel))),
                               ceil_mode=bool(node.attributes.get("ceil_mode", 0)))
    return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))


_RANK_FROM_INFERENCE = "it reads the spatial rank from the input's inferred shape, which inference can lose"
for _version in (7, 10, 11):
    register("AveragePool", _version, replaces=_RANK_FROM_INFERENCE)(average_pool)
for _version in (8, 10, 11, 12):
    register("MaxPool", _version, replaces=_RANK_FROM_INFERENCE)(max_pool)


class GlobalPool(torch.nn.Module):
    """Mean or maximum over every axis after the channels, whatever the rank."""

    def __init__(self, reduce: str):
        super().__init__()
        self.reduce = reduce

    def forward(self, x):
        axes = tuple(range(2, x.dim()))
        return x.mean(dim=axes, keepdim=True) if self.reduce == "mean" else x.amax(dim=axes, keepdim=True)


@register("GlobalAveragePool", 1, replaces="with no inferred shape for its input it averages over every "
          "axis, batch and channels included")
def global_average_pool(node, graph):
    return OperationConverterResult(torch_module=GlobalPool("mean"), onnx_mapping=onnx_mapping_from_node(node))


@register("GlobalMaxPool", 1)
def global_max_pool(node, graph):
    return OperationConverterResult(torch_module=GlobalPool("max"), onnx_mapping=onnx_mapping_from_node(node))
