"""Activations added to ONNX after onnx2torch's last converters."""
from __future__ import annotations

import torch
from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

from . import register


@register("Gelu", 20)
def gelu(node, graph):
    approximate = node.attributes.get("approximate", "none")
    if isinstance(approximate, bytes):
        approximate = approximate.decode()
    return OperationConverterResult(torch_module=torch.nn.GELU(approximate=approximate),
                                    onnx_mapping=onnx_mapping_from_node(node))
