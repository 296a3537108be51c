"""The graph's own input and output contract, read from the graph: which input is the image, its layout,
size, channels and dtype; which output holds the class scores, and whether they are probabilities."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import InvalidParameterError, UnsupportedModelError
from ..graph import IMAGE_TYPES, dims, elem_type, producers, real_inputs

LAYOUTS = ("NCHW", "NHWC")
DEFAULT_SIZE = 224
# Ops that only move or relabel values: looking through them from the output finds a Softmax.
_PASS_THROUGH = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Transpose"}


@dataclass(frozen=True)
class InputSpec:
    name: str
    layout: str  # "NCHW" or "NHWC"
    height: int
    width: int
    channels: int  # 1 or 3
    dtype: np.dtype  # float32, float16, float64 or uint8
    fixed_batch: int | None  # the batch size the graph was exported with, None if dynamic

    @property
    def size(self) -> tuple[int, int]:
        return self.height, self.width


@dataclass(frozen=True)
class OutputSpec:
    name: str
    num_classes: int | None
    softmax_input: str | None  # the logits tensor feeding a trailing Softmax, when there is one
    is_probability: bool | None  # None until probed


def _describe(vi: onnx.ValueInfoProto) -> str:
    t = elem_type(vi)
    dtype = np.dtype(IMAGE_TYPES[t]).name if t in IMAGE_TYPES else type_name(t)
    return f"{vi.name!r} {['?' if d is None else d for d in dims(vi)]} {dtype}"


def type_name(elem_type: int) -> str:
    """A TensorProto element type's name; 'unknown element type N' for a number ONNX does not define."""
    try:
        return onnx.TensorProto.DataType.Name(elem_type)
    except ValueError:
        return f"unknown element type {elem_type}"


def find_image_input(model: onnx.ModelProto, layout: str | None = None,
                     size: tuple[int, int] | None = None) -> InputSpec:
    """The one rank-4 float/uint8 input with 1 or 3 channels (NCHW or NHWC); ``layout`` overrides."""
    if layout is not None and layout not in LAYOUTS:
        raise InvalidParameterError(f"load: input_layout must be one of {LAYOUTS}; got {layout!r}.")
    inputs = real_inputs(model.graph)
    if not inputs:
        raise UnsupportedModelError("the graph has no inputs; it cannot be an image classifier.")
    candidates = []
    for vi in inputs:
        shape = dims(vi)
        if elem_type(vi) not in IMAGE_TYPES or len(shape) != 4:
            continue
        found = layout or _guess_layout(shape)
        if found is not None:
            candidates.append((vi, found))
    if not candidates:
        raise UnsupportedModelError(
            "no graph input looks like an image batch (rank 4, float or uint8, 1 or 3 channels in "
            "NCHW or NHWC); inputs: " + "; ".join(_describe(v) for v in inputs)
            + ". Pass input_layout= if the channel count is symbolic.")
    vi, found = candidates[0]
    others = [v for v in inputs if v.name != vi.name]
    if others:
        raise UnsupportedModelError(
            f"the graph needs inputs besides the image {vi.name!r}: "
            + "; ".join(_describe(v) for v in others)
            + ". onnx-explainer feeds one image input; fold the others into the graph as initializers.")
    shape = dims(vi)
    c_axis, h_axis, w_axis = (1, 2, 3) if found == "NCHW" else (3, 1, 2)
    channels = shape[c_axis] or 3
    if channels not in (1, 3):
        raise UnsupportedModelError(
            f"input {_describe(vi)} has {channels} channels in {found} layout; 1 or 3 are supported.")
    height, width = shape[h_axis], shape[w_axis]
    if height is None or width is None:
        height, width = size or (DEFAULT_SIZE, DEFAULT_SIZE)
    elif size is not None and tuple(size) != (height, width):
        raise InvalidParameterError(
            f"the graph fixes the input size to {height}x{width}; the preprocessing asks for "
            f"{size[0]}x{size[1]}.")
    return InputSpec(vi.name, found, int(height), int(width), int(channels),
                     np.dtype(IMAGE_TYPES[elem_type(vi)]), shape[0])


def _guess_layout(shape) -> str | None:
    nchw = shape[1] in (1, 3)
    nhwc = shape[3] in (1, 3)
    if nchw:
        return "NCHW"
    if nhwc:
        return "NHWC"
    if shape[1] is None and shape[3] is None:
        return "NCHW"
    return None


def find_scores_output(model: onnx.ModelProto) -> OutputSpec:
    """The class-score output: the first graph output; a Softmax feeding it (through reshapes) marks
    probabilities and names the logits."""
    g = model.graph
    if not g.output:
        raise UnsupportedModelError("the graph has no outputs.")
    out = g.output[0]
    shape = dims(out)
    num = None
    if shape and all(d is not None for d in shape[1:]):
        num = int(np.prod(shape[1:])) if len(shape) > 1 else None
        non_unit = [d for d in shape[1:] if d != 1]
        if len(non_unit) > 1:
            raise UnsupportedModelError(
                f"output {_describe(out)} is not a vector of class scores per image (expected "
                "(N, K) or (N, K, 1, 1)); segmentation and detection models are not supported.")
    prod = producers(g)
    name, node = out.name, prod.get(out.name)
    while node is not None and node.op_type in _PASS_THROUGH:
        name = node.input[0]
        node = prod.get(name)
    if node is not None and node.op_type == "Softmax":
        return OutputSpec(out.name, num, node.input[0], True)
    return OutputSpec(out.name, num, None, None)


# Ops that move or retype pixels on their way to the first learned layer; arithmetic with constants
# there is the graph normalising its own input.
_MOVES = {"Cast", "Transpose", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten"}
_ARITHMETIC = {"Sub": "-", "Div": "/", "Mul": "*", "Add": "+"}
_LEARNED = {"Conv", "ConvInteger", "QLinearConv", "MatMul", "MatMulInteger", "QLinearMatMul", "Gemm"}


@dataclass(frozen=True)
class InputNormalisation:
    """What a graph does to its image input before its first learned layer."""
    steps: tuple[str, ...]  # e.g. "Sub [123.7, 116.3, 103.5] (/Sub)"
    pixel_range: float  # 255.0: it expects pixels 0..255; 1.0: pixels already scaled to 0..1


def find_input_normalisation(model: onnx.ModelProto, image_input: str) -> InputNormalisation | None:
    """The steps a graph applies to its image input before its first learned layer (Conv, MatMul,
    Gemm): arithmetic with constants of at most one value per channel (x - mean, / std, * scale), seen
    through casts, transposes and reshapes (Shape and Size of the input are passed by). None: the graph
    expects normalised input. The constants tell the range it expects: a division by 255 (or 127.5), a
    mean above 1 or a uint8 input mean pixels 0..255; means and scales of 0..1 images mean 0..1."""
    from ..graph import constant_value, elem_type, layer_name

    g = model.graph
    chain, steps, big = {image_input}, [], False
    for node in g.node:
        inputs = [i for i in node.input if i]
        if not any(i in chain for i in inputs) or node.op_type in ("Shape", "Size"):
            continue
        if node.op_type in _LEARNED:
            break
        if node.op_type in _MOVES:
            chain.add(node.output[0])
            continue
        if node.op_type in _ARITHMETIC and len(inputs) == 2:
            other = inputs[1] if inputs[0] in chain else inputs[0]
            value = constant_value(g, other)
            if value is not None and np.asarray(value).size in (1, 3) and other not in chain:
                v = np.abs(np.asarray(value, np.float64).ravel())
                big |= bool((node.op_type in ("Sub", "Add") and v.max() > 1.5)
                            or (node.op_type == "Div" and v.max() > 1.5)
                            or (node.op_type == "Mul" and v.min() < 0.1 and v.max() > 0))
                shown = np.round(np.asarray(value, np.float64).ravel(), 4).tolist()
                steps.append(f"{node.op_type} {shown[0] if len(shown) == 1 else shown} ({layer_name(node)})")
                chain.add(node.output[0])
                continue
        break  # anything else (Resize, Slice, ...) ends the search
    if not steps:
        return None
    image = next(vi for vi in g.input if vi.name == image_input)
    uint8 = elem_type(image) == onnx.TensorProto.UINT8
    return InputNormalisation(tuple(steps), 255.0 if big or uint8 else 1.0)
