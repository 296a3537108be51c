"""ONNX sequences as Python lists of tensors: SequenceEmpty, SequenceConstruct, SequenceInsert, SequenceAt,
SequenceErase, SequenceLength, ConcatFromSequence and SplitToSequence. torch's exporter writes them for
scripted code that builds a list in a loop (``rows.append(...)`` then ``torch.stack(rows)``: a Loop
carrying a sequence, then ConcatFromSequence) or iterates over ``torch.split``'s pieces (SplitToSequence,
SequenceAt, SequenceLength). A list carries no values of its own, so the gradient passes through every
op here to the tensors in it; positions and lengths only select."""
from __future__ import annotations

import torch
from onnx2torch.utils.common import OnnxMapping, OperationConverterResult

from . import register


def _position(position, length: int, insert: bool = False) -> int:
    """ONNX's position (negative counts from the back; an insert may name the end) as a list index,
    refused out of range as onnxruntime refuses it."""
    p = int(position.reshape(()))
    top = length if insert else length - 1
    if not -length <= p <= top:
        raise IndexError(f"sequence position {p} is out of range for a sequence of {length} tensors")
    return p + length if p < 0 else p


class SequenceEmpty(torch.nn.Module):
    def forward(self) -> list:
        return []


class SequenceConstruct(torch.nn.Module):
    def forward(self, *tensors) -> list:
        return list(tensors)


class SequenceInsert(torch.nn.Module):
    def forward(self, sequence: list, tensor, position=None) -> list:
        out = list(sequence)  # a new list: the input sequence may be read elsewhere too
        out.insert(len(out) if position is None else _position(position, len(out), insert=True), tensor)
        return out


class SequenceAt(torch.nn.Module):
    def forward(self, sequence: list, position):
        return sequence[_position(position, len(sequence))]


class SequenceErase(torch.nn.Module):
    def forward(self, sequence: list, position=None) -> list:
        out = list(sequence)
        del out[len(out) - 1 if position is None else _position(position, len(out))]
        return out


class SequenceLength(torch.nn.Module):
    def forward(self, sequence: list):
        return torch.tensor(len(sequence), dtype=torch.int64)


class ConcatFromSequence(torch.nn.Module):
    def __init__(self, axis: int, new_axis: bool):
        super().__init__()
        self.axis, self.new_axis = axis, new_axis

    def forward(self, sequence: list):
        if not sequence:
            raise ValueError("ConcatFromSequence of an empty sequence")
        if self.new_axis:
            return torch.stack(sequence, dim=self.axis % (sequence[0].dim() + 1))
        return torch.cat(sequence, dim=self.axis % sequence[0].dim())


class SplitToSequence(torch.nn.Module):
    def __init__(self, axis: int, keepdims: bool):
        super().__init__()
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x, split=None) -> list:
        axis = self.axis % x.dim()
        if split is None:  # pieces of one along the axis, the axis dropped unless keepdims
            pieces = list(torch.split(x, 1, dim=axis))
            return pieces if self.keepdims else [p.squeeze(axis) for p in pieces]
        sizes = split.reshape(-1).tolist()
        if split.dim() == 0:  # pieces of that size, the last one shorter
            return list(torch.split(x, int(sizes[0]), dim=axis))
        if sum(sizes) != x.shape[axis]:
            raise ValueError(f"SplitToSequence: split {sizes} does not sum to the axis' length {x.shape[axis]}")
        return list(torch.split(x, [int(s) for s in sizes], dim=axis))


def _simple(module_type):
    def convert(node, graph):
        return OperationConverterResult(torch_module=module_type(),
                                        onnx_mapping=OnnxMapping(inputs=tuple(i for i in node.input_values if i),
                                                                 outputs=node.output_values))
    return convert


def _positional(module_type, count: int):
    """A converter for ops whose optional inputs are trailing: absent ones are left off the call."""
    def convert(node, graph):
        inputs = list(node.input_values[:count])
        while inputs and not inputs[-1]:
            inputs.pop()
        if any(not name for name in inputs):
            raise NotImplementedError(f"{node.operation_type} with an absent input before a given one")
        return OperationConverterResult(torch_module=module_type(),
                                        onnx_mapping=OnnxMapping(inputs=tuple(inputs), outputs=node.output_values))
    return convert


def _concat_from_sequence(node, graph):
    if "axis" not in node.attributes:
        raise NotImplementedError("ConcatFromSequence without its required attribute axis")
    return OperationConverterResult(
        torch_module=ConcatFromSequence(int(node.attributes["axis"]), bool(node.attributes.get("new_axis", 0))),
        onnx_mapping=OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values))


def _split_to_sequence(node, graph):
    inputs = tuple(i for i in node.input_values[:2] if i)
    return OperationConverterResult(
        torch_module=SplitToSequence(int(node.attributes.get("axis", 0)), bool(node.attributes.get("keepdims", 1))),
        onnx_mapping=OnnxMapping(inputs=inputs, outputs=node.output_values))


register("SequenceEmpty", 11)(_simple(SequenceEmpty))
register("SequenceConstruct", 11)(_simple(SequenceConstruct))
register("SequenceInsert", 11)(_positional(SequenceInsert, 3))
register("SequenceAt", 11)(_positional(SequenceAt, 2))
register("SequenceErase", 11)(_positional(SequenceErase, 2))
register("SequenceLength", 11)(_simple(SequenceLength))
register("ConcatFromSequence", 11)(_concat_from_sequence)
register("SplitToSequence", 11)(_split_to_sequence)
