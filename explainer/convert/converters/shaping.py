"""Rearranging ops whose onnx2torch converters differ from ONNX for some attribute values: Flatten
with ``axis=0``, CumSum without ``reverse`` (onnx2torch's default is 1, ONNX's 0), DepthToSpace in
DCR mode (ONNX's default, refused by onnx2torch), Split-18's ``num_outputs`` over a length it does not
divide (onnx2torch splits into more parts than the node has outputs); Col2Im (none in onnx2torch: VOLO's
outlook attention, Hugging Face MobileViTV2's fold), two spatial dimensions, as torch's ``fold``."""
from __future__ import annotations

import math

import torch
from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

from . import register


class Flatten(torch.nn.Module):
    """ONNX Flatten: (prod(shape[:axis]), prod(shape[axis:])), for any axis in [-rank, rank]."""

    def __init__(self, axis: int):
        super().__init__()
        self.axis = axis

    def forward(self, x):
        axis = self.axis % x.dim() if self.axis < 0 else self.axis
        return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def flatten(node, graph):
    return OperationConverterResult(torch_module=Flatten(node.attributes.get("axis", 1)),
                                    onnx_mapping=onnx_mapping_from_node(node))


for _version in (9, 11, 13):
    register("Flatten", _version, replaces="axis=0 fails (it flattens to 1-D, then from axis 1)")(flatten)


class CumSum(torch.nn.Module):
    def __init__(self, exclusive: bool, reverse: bool):
        super().__init__()
        self.exclusive, self.reverse = exclusive, reverse

    def forward(self, x, axis):
        axis = int(axis.reshape(-1)[0]) if isinstance(axis, torch.Tensor) else int(axis)
        if self.reverse:
            x = x.flip(axis)
        y = x.cumsum(axis)
        if self.exclusive:
            y = y - x
        return y.flip(axis) if self.reverse else y


def cumsum(node, graph):
    module = CumSum(bool(node.attributes.get("exclusive", 0)), bool(node.attributes.get("reverse", 0)))
    return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))


for _version in (11, 14):
    register("CumSum", _version, replaces="a node without 'reverse' is summed in reverse (its default is 1 "
             "there, 0 in ONNX)")(cumsum)


class DepthToSpace(torch.nn.Module):
    """ONNX DepthToSpace: DCR takes the block offsets from the channel's high part, CRD from its low
    part (torch's pixel_shuffle)."""

    def __init__(self, blocksize: int, mode: str):
        super().__init__()
        self.blocksize, self.mode = blocksize, mode

    def forward(self, x):
        b = self.blocksize
        if self.mode == "CRD":
            return torch.pixel_shuffle(x, b)
        n, c, h, w = x.shape
        y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
        return y.reshape(n, c // (b * b), h * b, w * b)


def depth_to_space(node, graph):
    mode = node.attributes.get("mode", "DCR")
    if mode not in ("DCR", "CRD"):
        raise NotImplementedError(f"DepthToSpace with mode={mode!r} has no converter")
    return OperationConverterResult(torch_module=DepthToSpace(node.attributes["blocksize"], mode),
                                    onnx_mapping=onnx_mapping_from_node(node))


for _version in (11, 13):
    register("DepthToSpace", _version, replaces="it refuses mode DCR, ONNX's default")(depth_to_space)


class Split(torch.nn.Module):
    """ONNX Split-18: the lengths given, else ``parts`` parts of ceil(length / parts) (the last one
    shorter)."""

    def __init__(self, axis: int, parts: int):
        super().__init__()
        self.axis, self.parts = axis, parts

    def forward(self, x, split=None):
        if split is not None:
            return torch.split(x, [int(s) for s in split.tolist()], dim=self.axis)
        return torch.split(x, -(-x.shape[self.axis] // self.parts), dim=self.axis)


@register("Split", 18)
def split(node, graph):
    parts = node.attributes.get("num_outputs", len(node.output_values))
    return OperationConverterResult(torch_module=Split(node.attributes.get("axis", 0), parts),
                                    onnx_mapping=onnx_mapping_from_node(node))


class Slice(torch.nn.Module):
    """ONNX Slice-10/11/13: ``starts``, ``ends``, ``axes``, ``steps`` as inputs (constants or computed),
    clamped as the operator's definition says (negative steps included). onnx2torch's own indexes with a
    list of slices, which torch deprecates (a UserWarning on every call; an error or another result once
    torch treats such a list as a tensor index)."""

    def forward(self, x, starts, ends, axes=None, steps=None):
        starts, ends = starts.tolist(), ends.tolist()
        axes = list(range(len(starts))) if axes is None else axes.tolist()
        steps = [1] * len(starts) if steps is None else steps.tolist()
        index: list = [slice(None)] * x.dim()
        picks = []
        for start, end, axis, step in zip(starts, ends, axes, steps):
            axis = axis % x.dim()
            dim = x.shape[axis]
            start = start + dim if start < 0 else start
            end = end + dim if end < 0 else end
            if step > 0:
                index[axis] = slice(min(max(start, 0), dim), min(max(end, 0), dim), step)
            else:  # torch slices forward only: the positions, in order
                first, stop = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
                picks.append((axis, torch.arange(first, stop, step, device=x.device)))
        x = x[tuple(index)]
        for axis, positions in picks:
            x = x.index_select(axis, positions)
        return x


def slice_(node, graph):
    return OperationConverterResult(torch_module=Slice(), onnx_mapping=onnx_mapping_from_node(node))


for _version in (10, 11, 13):
    register("Slice", _version, replaces="it indexes with a list of slices, which torch deprecates "
                                         "(a warning on every call)")(slice_)


class Col2Im(torch.nn.Module):
    """ONNX Col2Im of two spatial dimensions: (N, C * kh * kw, L) blocks summed back into (N, C, H, W)
    images, ``image_shape`` (H, W) and ``block_shape`` (kh, kw) read from their tensors at run time;
    torch's ``fold``."""

    def __init__(self, dilations, pads, strides):
        super().__init__()
        self.dilations, self.pads, self.strides = tuple(dilations), tuple(pads), tuple(strides)

    def forward(self, x, image_shape, block_shape):
        return torch.nn.functional.fold(x, tuple(int(v) for v in image_shape.tolist()),
                                        tuple(int(v) for v in block_shape.tolist()), dilation=self.dilations,
                                        padding=self.pads, stride=self.strides)


@register("Col2Im", 18)
def col2im(node, graph):
    attrs = node.attributes
    dilations, pads, strides = (list(attrs.get(k, default)) for k, default in
                                (("dilations", [1, 1]), ("pads", [0, 0, 0, 0]), ("strides", [1, 1])))
    if len(dilations) != 2 or len(strides) != 2 or len(pads) != 4:
        raise NotImplementedError("Col2Im has a converter for two spatial dimensions only (torch's fold)")
    if pads[:2] != pads[2:]:
        raise NotImplementedError(f"Col2Im with pads={pads} (not the same at both ends) has no converter")
    return OperationConverterResult(torch_module=Col2Im(dilations, pads[:2], strides),
                                    onnx_mapping=onnx_mapping_from_node(node))
