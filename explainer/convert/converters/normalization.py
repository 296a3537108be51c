"""LayerNormalization over the trailing axes the node names, whatever shapes inference recorded."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from onnx2torch.utils.common import OnnxMapping, OperationConverterResult, onnx_mapping_from_node

from . import register


class LayerNorm(torch.nn.Module):
    """ONNX LayerNormalization: normalised over ``inputs.shape[axis:]``; scale and bias as given."""

    def __init__(self, axis: int, epsilon: float, scale=None, bias=None):
        super().__init__()
        self.axis, self.epsilon = axis, epsilon
        self.scale = None if scale is None else torch.nn.Parameter(scale, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def forward(self, x, scale=None, bias=None):
        scale = self.scale if scale is None else scale
        bias = self.bias if bias is None else bias
        shape = x.shape[self.axis % x.dim():]
        return F.layer_norm(x, shape, None if scale is None else scale.expand(shape),
                            None if bias is None else bias.expand(shape), self.epsilon)


@register("LayerNormalization", 17, replaces="it takes the normalised shape from inferred shapes, which "
          "are wrong or missing once the batch is freed (Swin, MobileViT)")
def layer_normalization(node, graph):
    axis = node.attributes.get("axis", -1)
    epsilon = node.attributes.get("epsilon", 1e-5)
    weights = [name for name in node.input_values[1:] if name]
    if all(name in graph.initializers for name in weights):
        values = [graph.initializers[name].to_torch() for name in weights]
        module = LayerNorm(axis, epsilon, *values)
        return OperationConverterResult(torch_module=module, onnx_mapping=OnnxMapping(
            inputs=(node.input_values[0],), outputs=node.output_values))
    return OperationConverterResult(torch_module=LayerNorm(axis, epsilon), onnx_mapping=onnx_mapping_from_node(node))
