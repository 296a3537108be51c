"""What the graph's wiring says about its tensors, whatever exporter wrote it: which tensors carry the
image's values, which are attention (scores before their Softmax, probabilities after it), and which
channel widths a transformer's token stream has.

Exporters write the same network differently: torch's legacy exporter before opset 17 and tf2onnx spell
LayerNormalization as ReduceMean/Sub/Pow/Sqrt/Div; attention is MatMul → scale → (mask) → Softmax →
MatMul in every exporter, but with or without Transposes, Casts and Reshapes between. So these facts are
read from the data flow, never from op names alone:

- **image-dependent** tensors: those the image's values reach (through Shape, Size and the like only the
  image's size flows, not its values: a mask built from shapes does not depend on the image);
- **attention** tensors: a Softmax whose input comes, through elementwise and layout ops, from a MatMul
  (or Einsum) of two image-dependent operands (queries times keys), the tensors on that path, and the
  Softmax's output until the MatMul with the values; a Softmax over a layer with constant weights (the
  classifier's own) is not attention. Talking-heads attention (CaiT's self-attention: Shazeer et al.
  2020) mixes the heads by a constant square (heads x heads) matrix before the Softmax and after it: one
  such mixing is followed on each side of the Softmax, so a classifier head (a constant matrix of
  another shape, or one that does not lead back to a product of two image-dependent operands) stays
  no attention;
- **layer norms** and the **token channels** they show: the widths that layer norms normalise over the
  last axis of (T, C) or (H, W, C) activations: LayerNormalization nodes and their decomposed form (a
  ReduceMean over the last axis subtracted from its own input, divided by a deviation computed from it,
  then scaled and shifted by constants).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..graph import attribute, constant_value, consumers, initializer_names, producers, reads, real_inputs

# through these only the input's shape or size flows, not its values
NO_VALUE_FLOW = frozenset({"Shape", "Size", "ConstantOfShape", "EyeLike"})
# ops between the query-key product and the Softmax, and between the Softmax and the product with the
# values: scaling, masks, casts, layout
_ATTENTION_PATH = frozenset({"Mul", "Div", "Add", "Sub", "Cast", "Where", "Reshape", "Transpose", "Identity",
                             "Clip", "Unsqueeze", "Squeeze", "Expand", "Dropout", "Slice", "Concat", "Max",
                             "Min", "Neg"})
_PRODUCTS = frozenset({"MatMul", "Einsum", "Gemm"})


@dataclass(frozen=True)
class Structure:
    image_dependent: frozenset
    attention: frozenset
    token_channels: frozenset  # empty: no layer norm over a last axis
    norms: frozenset  # outputs of layer norms over the last axis, as nodes or decomposed (after scale, bias)


def analyse(graph: onnx.GraphProto, image: str, shapes: dict[str, tuple | None]) -> Structure:
    """``shapes``: per-image shapes by tensor name (None where unknown)."""
    flows = image_dependent(graph, image)
    widths, norms = layer_norms(graph, shapes, flows)
    return Structure(frozenset(flows), frozenset(attention_tensors(graph, flows)), frozenset(widths),
                     frozenset(norms))


def image_dependent(graph: onnx.GraphProto, image: str) -> set[str]:
    """Tensors whose values the image's values reach."""
    reached = {image}
    for node in graph.node:  # nodes are topologically sorted in a valid graph
        if node.op_type in NO_VALUE_FLOW:
            continue
        if any(i in reached for i in reads(node) if i):  # a Loop's body reads the sequence from around it
            reached.update(o for o in node.output if o)
    return reached


def image_reads(graph: onnx.GraphProto, reads, flows=None) -> list[str]:
    """Which of ``reads`` (tensors a head reads from the graph around it: ``graph.head_nodes``) carry
    the values of the graph's inputs, sorted: the tensors ``flows`` holds (``image_dependent``; default:
    the tensors every fed input reaches) and tensors that no node computes and no weight holds (inputs)."""
    if flows is None:
        flows = set().union(*(image_dependent(graph, i.name) for i in real_inputs(graph)))
    producer, weights = producers(graph), initializer_names(graph)
    return sorted(t for t in reads if t in flows or (t not in producer and t not in weights))


def attention_tensors(graph: onnx.GraphProto, flows: set[str]) -> set[str]:
    made_by = producers(graph)
    used_by = consumers(graph)
    found: set[str] = set()
    for node in graph.node:
        if node.op_type != "Softmax" or not node.input or node.input[0] not in flows:
            continue
        path = _back_to_product(node.input[0], made_by, flows, graph)
        if path is None:
            continue
        found.update(path)
        found.update(_on_to_product(node.output[0], used_by, flows, graph))
    return found


def _mixes_heads(node: onnx.NodeProto, flows: set[str], graph: onnx.GraphProto) -> str | None:
    """The image-dependent operand of ``node`` when it is a talking-heads mixing: a MatMul (or Gemm)
    of one image-dependent tensor by a constant square matrix (heads x heads); else None."""
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
        return None
    carrier, weight = node.input[0], node.input[1]
    if carrier not in flows or not weight or weight in flows:
        return None
    value = constant_value(graph, weight)
    if value is None or value.ndim != 2 or value.shape[0] != value.shape[1]:
        return None
    return carrier


def _back_to_product(tensor: str, made_by, flows: set[str], graph: onnx.GraphProto,
                     limit: int = 12) -> list[str] | None:
    """The tensors from a query-key product to ``tensor`` (inclusive), or None when ``tensor`` is not
    such a product's descendant through the attention path's ops (and at most one talking-heads
    mixing)."""
    path = [tensor]
    mixed = False
    for _ in range(limit):
        node = made_by.get(tensor)
        if node is None:
            return None
        if node.op_type in _PRODUCTS:
            operands = [i for i in node.input[:2] if i]
            if len(operands) == 2 and all(i in flows for i in operands):
                return path
            carrier = None if mixed else _mixes_heads(node, flows, graph)
            if carrier is None:
                return None
            mixed = True
            tensor = carrier
            path.append(tensor)
            continue
        if node.op_type not in _ATTENTION_PATH:
            return None
        carriers = [i for i in node.input if i and i in flows]
        if not carriers:
            return None
        tensor = carriers[0]
        path.append(tensor)
    return None


def _on_to_product(tensor: str, used_by, flows: set[str], graph: onnx.GraphProto, limit: int = 8) -> list[str]:
    """The Softmax's output and the tensors after it up to (not including) the product with the values
    (through at most one talking-heads mixing)."""
    path = [tensor]
    frontier = [tensor]
    mixed = False
    for _ in range(limit):
        following = []
        for t in frontier:
            for node in used_by.get(t, []):
                if node.op_type in _ATTENTION_PATH:
                    following.extend(o for o in node.output if o)
                elif not mixed and _mixes_heads(node, flows, graph) == t:
                    mixed = True
                    following.extend(o for o in node.output if o)
        path.extend(following)
        frontier = following
        if not frontier:
            break
    return path


def layer_norms(graph: onnx.GraphProto, shapes: dict[str, tuple | None], flows: set[str]) -> tuple[set[int], set[str]]:
    """(widths, outputs) of the norms over the last axis of rank-2 (T, C) or rank-3 (H, W, C)
    activations: LayerNormalization nodes, and the decomposed form ``(x - mean(x)) / sqrt(var + eps)``
    followed by its scale and bias where they are there."""
    widths, outputs = set(), set()
    used_by = consumers(graph)
    for node in graph.node:
        x = node.input[0] if node.input else ""
        shape = shapes.get(x)
        if not shape or len(shape) not in (2, 3) or shape[-1] is None:
            continue
        if node.op_type == "LayerNormalization" and attribute(node, "axis", -1) in (-1, len(shape)):
            widths.add(shape[-1])
            outputs.add(node.output[0])
        elif _mean_over_last_axis(graph, node, shape):
            centring = [u for u in used_by.get(x, []) if u.op_type == "Sub" and list(u.input) == [x, node.output[0]]]
            if centring:
                widths.add(shape[-1])
                end = (_normalised(centring[0].output[0], used_by, flows)
                       or _rescaled(x, used_by, flows))
                if end:
                    outputs.add(end)
    return widths, outputs


def _mean_over_last_axis(graph: onnx.GraphProto, node: onnx.NodeProto, shape: tuple) -> bool:
    """ReduceMean over the last axis, or GlobalAveragePool of (N, T, C) activations, which averages
    over the last axis (tf2onnx writes a layer norm's moments so)."""
    if node.op_type == "ReduceMean":
        return _last_axis_only(graph, node, len(shape) + 1)
    return node.op_type == "GlobalAveragePool" and len(shape) == 2


def _normalised(centred: str, used_by, flows: set[str]) -> str | None:
    """The decomposed norm's output from its centred input: the Div (or Mul) of the centred values by
    something computed from them (not the squaring), then its Mul by a constant scale and Add of a
    constant bias when they follow."""
    divided = [u for u in used_by.get(centred, []) if u.op_type in ("Div", "Mul") and u.input[0] == centred
               and u.input[1] != centred and u.input[1] in flows]
    if not divided:
        return None
    out = divided[0].output[0]
    for op in ("Mul", "Add"):
        following = used_by.get(out, [])
        if len(following) == 1 and following[0].op_type == op and sum(i in flows for i in following[0].input) == 1:
            out = following[0].output[0]
    return out


def _rescaled(x: str, used_by, flows: set[str]) -> str | None:
    """The output of the norm written as ``x * inv + (beta - mean * inv)`` (Keras's layer norm through
    tf2onnx): the Add after the Mul of ``x`` by a factor computed from it, then a constant bias."""
    for node in used_by.get(x, []):
        if node.op_type != "Mul" or x not in node.input:
            continue
        factor = [i for i in node.input if i != x]
        following = used_by.get(node.output[0], [])
        if factor and factor[0] in flows and len(following) == 1 and following[0].op_type == "Add":
            out = following[0].output[0]
            after = used_by.get(out, [])
            if len(after) == 1 and after[0].op_type == "Add" and sum(i in flows for i in after[0].input) == 1:
                out = after[0].output[0]
            return out
    return None


def _last_axis_only(graph: onnx.GraphProto, node: onnx.NodeProto, rank: int) -> bool:
    axes = attribute(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = constant_value(graph, node.input[1])
    if axes is None:
        return False
    axes = [int(a) for a in np.asarray(axes).ravel()]
    return len(axes) == 1 and axes[0] % rank == rank - 1
