"""Normalisations over the input's channel axis or trailing axes, for inputs of any rank: none of these
converters reads a shape that shape inference recorded (onnx2torch's BatchNormalization and
InstanceNormalization pick a torch class by the rank recorded for the input, and fail with "spatial
rank == -2" where inference lost it, as it does after a Reshape-13 with a computed target)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from onnx2torch.utils.common import OnnxMapping, OperationConverterResult, onnx_mapping_from_node

from . import register


def _constant_weights(node, graph, first: int = 1) -> list | None:
    """The node's weight inputs (from ``first`` on) as tensors when all are initializers, else None."""
    names = [name for name in node.input_values[first:] if name]
    if all(name in graph.initializers for name in names):
        return [graph.initializers[name].to_torch() for name in names]
    return None


def _input_only(node) -> OnnxMapping:
    return OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values)


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
    values = _constant_weights(node, graph)
    if values is not None:
        return OperationConverterResult(torch_module=LayerNorm(axis, epsilon, *values), onnx_mapping=_input_only(node))
    return OperationConverterResult(torch_module=LayerNorm(axis, epsilon), onnx_mapping=onnx_mapping_from_node(node))


class BatchNorm(torch.nn.Module):
    """Inference-mode ONNX BatchNormalization over axis 1 of an input of any rank >= 2: (x - mean) /
    sqrt(var + epsilon) * scale + bias, with the running statistics as stored (``momentum`` only
    updates them in training, which is refused)."""

    def __init__(self, epsilon: float, scale=None, bias=None, mean=None, var=None):
        super().__init__()
        self.epsilon = epsilon
        for name, value in (("weight", scale), ("bias", bias), ("running_mean", mean), ("running_var", var)):
            self.register_buffer(name, value)

    def forward(self, x, scale=None, bias=None, mean=None, var=None):
        if scale is None:
            scale, bias, mean, var = self.weight, self.bias, self.running_mean, self.running_var
        return F.batch_norm(x, mean, var, scale, bias, training=False, momentum=0.0, eps=self.epsilon)


def batch_normalization(node, graph):
    if len([o for o in node.output_values if o]) > 1 or node.attributes.get("training_mode", 0):
        raise NotImplementedError("BatchNormalization in training mode (batch statistics, running mean and "
                                  "variance outputs) has no converter")
    epsilon = node.attributes.get("epsilon", 1e-5)
    values = _constant_weights(node, graph)
    if values is not None:
        return OperationConverterResult(torch_module=BatchNorm(epsilon, *values), onnx_mapping=_input_only(node))
    return OperationConverterResult(torch_module=BatchNorm(epsilon), onnx_mapping=onnx_mapping_from_node(node))


for _version in (9, 14, 15):
    register("BatchNormalization", _version, replaces="it picks BatchNorm1d/2d/3d by the input's inferred "
             "rank and fails where inference lost it")(batch_normalization)


class InstanceNorm(torch.nn.Module):
    """ONNX InstanceNormalization: each (sample, channel) normalised over all its other axes."""

    def __init__(self, epsilon: float, scale=None, bias=None):
        super().__init__()
        self.epsilon = epsilon
        self.register_buffer("weight", scale)
        self.register_buffer("bias", bias)

    def forward(self, x, scale=None, bias=None):
        if scale is None:
            scale, bias = self.weight, self.bias
        return F.instance_norm(x, weight=scale, bias=bias, use_input_stats=True, eps=self.epsilon)


def instance_normalization(node, graph):
    epsilon = node.attributes.get("epsilon", 1e-5)
    values = _constant_weights(node, graph)
    if values is not None:
        return OperationConverterResult(torch_module=InstanceNorm(epsilon, *values), onnx_mapping=_input_only(node))
    return OperationConverterResult(torch_module=InstanceNorm(epsilon), onnx_mapping=onnx_mapping_from_node(node))


for _version in (1, 6):
    register("InstanceNormalization", _version, replaces="it picks InstanceNorm1d/2d/3d by the input's "
             "inferred rank and fails where inference lost it")(instance_normalization)


class GroupNorm(torch.nn.Module):
    """ONNX GroupNormalization: ``num_groups`` groups of channels normalised together; scale and bias
    per group (opset 18) or per channel (opset 21)."""

    def __init__(self, groups: int, epsilon: float, per_group: bool):
        super().__init__()
        self.groups, self.epsilon, self.per_group = groups, epsilon, per_group

    def forward(self, x, scale, bias):
        if self.per_group:
            scale = scale.repeat_interleave(x.shape[1] // self.groups)
            bias = bias.repeat_interleave(x.shape[1] // self.groups)
        return F.group_norm(x, self.groups, scale, bias, self.epsilon)


def _group_normalization(per_group: bool):
    def convert(node, graph):
        module = GroupNorm(node.attributes["num_groups"], node.attributes.get("epsilon", 1e-5), per_group)
        return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))

    return convert


register("GroupNormalization", 18)(_group_normalization(per_group=True))
register("GroupNormalization", 21)(_group_normalization(per_group=False))
