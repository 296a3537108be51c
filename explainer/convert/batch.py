"""Passes that free a graph exported for batch 1 to run on any batch size.

Exporters bake the batch they traced with into constants: Reshape targets (``[1, 512]``, or
``[64, 49, 3, 3, 32]`` where Swin folds 64 windows of one image into dim 0), an ``Expand`` of a class
token to ``[1, 1, C]``, a class token pre-expanded by the dynamo exporter and concatenated with the
patch tokens, Resize sizes. ``free-batch`` follows the axis that carries the batch from the image
through the graph and rewrites each such constant so that this axis scales with the batch the graph is
run with. What it cannot see, ``Classifier`` catches: a batch of two must give what two runs
of one give, else the model falls back to batch 1 (with a warning saying why).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..graph import (all_nodes, attribute, constant_value, consumers, dims, measured_shapes, producers, reads,
                     subgraphs)
from .passes import register

# Outputs that describe a tensor's shape rather than carry its batch of values.
_SHAPE_OPS = {"Shape", "Size"}


@register("dynamic-batch", targets=("runtime", "torch"), order=10)
def dynamic_batch(model: onnx.ModelProto, ctx) -> int:
    """Make dim 0 of the image input and of every output symbolic, and drop stale intermediate shapes
    (they were recorded for batch 1 and would contradict larger batches), subgraphs' outputs' too."""
    g = model.graph
    changed = 0
    for vi in list(g.input) + list(g.output):
        if vi.name != ctx.image_input and vi not in g.output:
            continue
        shape = vi.type.tensor_type.shape
        if len(shape.dim) and shape.dim[0].dim_param != "N":
            shape.dim[0].Clear()
            shape.dim[0].dim_param = "N"
            changed += 1
    if len(g.value_info):
        del g.value_info[:]
        changed += 1
    for sub in (sub for node in all_nodes(g) for sub in subgraphs(node)):  # their outputs: exported batch too
        if len(sub.value_info):
            del sub.value_info[:]
            changed += 1
        for vi in sub.output:
            if vi.type.tensor_type.HasField("shape"):
                vi.type.tensor_type.ClearField("shape")
                changed += 1
    return changed


@register("drop-unused-inputs", targets=("runtime", "torch"), order=1)
def drop_unused_inputs(model: onnx.ModelProto, ctx) -> int:
    """Graph inputs no node reads (Caffe2's queue inputs) would still be demanded by onnxruntime."""
    g = model.graph
    used = {i for node in g.node for i in reads(node)} | {o.name for o in g.output}
    inits = {t.name for t in g.initializer}
    unused = [vi for vi in g.input if vi.name not in used and vi.name not in inits]
    for vi in unused:
        g.input.remove(vi)
    return len(unused)


class _Builder:
    """New nodes and constants for one graph, with names that collide with nothing in it."""

    def __init__(self, g: onnx.GraphProto, image: str):
        self.g = g
        self.taken = ({o for n in g.node for o in n.output} | {t.name for t in g.initializer}
                      | {i.name for i in g.input})
        self.image = image
        self.prologue: list[onnx.NodeProto] = []
        self._batch: str | None = None

    def name(self, base: str) -> str:
        name, i = base, 0
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name

    def const(self, base: str, value: np.ndarray) -> str:
        name = self.name(base)
        self.g.initializer.append(numpy_helper.from_array(value, name))
        return name

    @property
    def batch(self) -> str:
        """A 1-element int64 tensor holding the batch size the graph is run with."""
        if self._batch is None:
            shape, self._batch = self.name("free_batch__shape"), self.name("free_batch__n")
            index = self.const("free_batch__dim0", np.array([0], np.int64))
            self.prologue += [helper.make_node("Shape", [self.image], [shape]),
                              helper.make_node("Gather", [shape, index], [self._batch], axis=0)]
        return self._batch

    def scaled_shape(self, shape: np.ndarray, j: int, nodes: list) -> str:
        """``shape`` with dim ``j`` multiplied by the batch size, as a tensor computed at run time."""
        scaled = self.batch
        if int(shape[j]) != 1:
            scaled = self.name("free_batch__scaled")
            k = self.const("free_batch__k", shape[j:j + 1].astype(np.int64))
            nodes.append(helper.make_node("Mul", [self.batch, k], [scaled]))
        parts = ([self.const("free_batch__head", shape[:j].astype(np.int64))] if j else []) + [scaled] + (
            [self.const("free_batch__tail", shape[j + 1:].astype(np.int64))] if j + 1 < len(shape) else [])
        if len(parts) == 1:
            return scaled
        out = self.name("free_batch__target")
        nodes.append(helper.make_node("Concat", parts, [out], axis=0))
        return out


def _shape_constant(g, name):
    value = constant_value(g, name) if name else None
    if value is None or value.ndim != 1 or len(value) == 0 or value.dtype.kind not in "iu":
        return None
    return value.astype(np.int64)


def _axes_list(g, node, name="axes") -> list[int] | None:
    if len(node.input) > 1 and node.input[1]:
        value = constant_value(g, node.input[1])
        return None if value is None else [int(v) for v in np.atleast_1d(value)]
    value = attribute(node, name)
    return None if value is None else [int(v) for v in value]


_SAME_AXIS = {"Relu", "Clip", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid", "LeakyRelu", "Elu", "Selu",
              "Gelu", "Erf", "Exp", "Log", "Sqrt", "Neg", "Abs", "Cast", "Identity", "Dropout", "Softmax",
              "LogSoftmax", "LayerNormalization", "BatchNormalization", "InstanceNormalization", "Conv",
              "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LRN", "Pad",
              "Resize", "Upsample", "Slice", "Split", "Concat", "Tile", "Softplus", "Mish", "PRelu",
              "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Not", "DepthToSpace", "SpaceToDepth",
              "Trilu", "Where", "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Equal",
              "Less", "Greater", "And", "Or", "Mod", "Expand", "CumSum", "QuantizeLinear",
              "DequantizeLinear", "GroupNormalization"}


def _prod(values) -> int:
    return int(np.prod(np.asarray(values, dtype=np.int64))) if len(values) else 1


def _reshaped_axis(s_in: list[int], a: int, o: int, s_out: list[int]) -> tuple[int, int] | None:
    """Where a Reshape from ``s_in`` to ``s_out`` (shapes at batch 1) puts the batch that input axis
    ``a`` carries (with ``o`` elements' worth of that dim outside it): ``outer`` elements lie outside
    the batch, ``inner`` inside. Any output dim ``j`` whose outer dims divide ``outer`` and inner dims
    divide ``inner`` could hold it; a dim of 1 right after exactly ``outer`` is the batch itself; else
    the batch merges with its neighbours, and of those the innermost that is not the feature (last)
    axis is taken: torch's MultiheadAttention turns (T, B, C) into (T, B*heads, d) and back into
    (T*B, C)."""
    outer, inner = _prod(s_in[:a]) * o, _prod(s_in[a:]) // o
    fits = [j for j in range(len(s_out))
            if outer % _prod(s_out[:j]) == 0 and inner % _prod(s_out[j + 1:]) == 0]
    for j in fits:
        if s_out[j] == 1 and _prod(s_out[:j]) == outer:
            return j, 1
    merged = [j for j in fits if j < len(s_out) - 1] or fits
    return (merged[-1], outer // _prod(s_out[:merged[-1]])) if merged else None


def _output_axis(g, node, k: int, a: int, o: int, shape_of) -> tuple[int, int] | None:
    """The (axis, outer part of that axis) of ``node``'s outputs that carries the batch, given that
    input ``k`` carries it on axis ``a`` with ``o`` elements' worth of that dim outside it; None where
    it cannot be told (the batch is then left alone)."""
    op = node.op_type
    s_in, s_out = shape_of(node.input[k]), shape_of(node.output[0])
    if s_in is None:
        return None
    r_in = len(s_in)
    if op == "Transpose":
        perm = attribute(node, "perm") or list(range(r_in))[::-1]
        return list(perm).index(a), o
    if op == "Reshape":
        return None if s_out is None or None in s_in or None in s_out else _reshaped_axis(s_in, a, o, s_out)
    if op == "Flatten":
        axis = attribute(node, "axis", 1) % max(r_in, 1)
        if None in s_in[:a] or a >= axis and None in s_in[axis:a]:
            return None
        return (0, _prod(s_in[:a]) * o) if a < axis else (1, _prod(s_in[axis:a]) * o)
    if op in ("Squeeze", "Unsqueeze"):
        axes = _axes_list(g, node)
        if axes is None:
            return None
        if op == "Squeeze":
            axes = [x % r_in for x in axes]
            return None if a in axes else (a - sum(x < a for x in axes), o)
        r_out = r_in + len(axes)
        inserted = sorted(x % r_out for x in axes)
        kept = [j for j in range(r_out) if j not in inserted]
        return kept[a], o
    if op == "Gather":
        axis = attribute(node, "axis", 0) % r_in
        if k == 0 and _strided_view(g, node, a, o, s_in) is not None:
            return 0, 1
        if k != 0 or axis == a:
            return None
        if axis > a:
            return a, o
        q = shape_of(node.input[1])
        return None if q is None else (a - 1 + len(q), o)
    if op.startswith("Reduce") or op in ("ArgMax", "ArgMin"):
        axes = _axes_list(g, node)
        if axes is None:
            return None
        axes = [x % r_in for x in axes]
        if a in axes:
            return None
        return (a, o) if attribute(node, "keepdims", 1) else (a - sum(x < a for x in axes), o)
    if op == "MatMul":
        if s_out is None:
            return None
        if k == 0 and a == r_in - 2 or a < r_in - 2:
            return a + len(s_out) - r_in, o
        if k == 1 and a == r_in - 1:
            return len(s_out) - 1, o
        return None
    if op == "Gemm":
        return (0, o) if k == 0 and a == 0 and not attribute(node, "transA", 0) else None
    if op in _SAME_AXIS:
        return (a, o) if s_out is None else (a + len(s_out) - r_in, o)
    return (a, o) if s_out is not None and len(s_out) == r_in else None


@register("free-batch", targets=("runtime", "torch"), order=9)
def free_batch(model: onnx.ModelProto, ctx) -> int:
    """See ``_free_batch``; a graph it cannot read (shapes of rank 0, sizes of 0) is left as exported,
    and then runs one image at a time."""
    backup = onnx.ModelProto()
    backup.graph.node.extend(model.graph.node)
    count = len(model.graph.initializer)
    try:
        return _free_batch(model, ctx)
    except (ArithmeticError, ValueError, IndexError, KeyError) as exc:
        del model.graph.node[:]
        model.graph.node.extend(backup.graph.node)
        del model.graph.initializer[count:]
        ctx.log.append(f"free-batch: left as exported ({type(exc).__name__}: {exc})")
        return 0


def _free_batch(model: onnx.ModelProto, ctx) -> int:
    """Constants that hold the exported batch (1) scale with the run's batch instead. Which axis holds
    the batch is followed from the image through the graph (Transpose moves it, a Reshape keeps the
    elements before it, MultiheadAttention puts it on axis 1, Swin folds windows into it):
    - Reshape of a batch-carrying tensor: the target's batch dim becomes -1, or ``k * N`` where another
      dim is -1 already (zoo GoogLeNet, AlexNet and ShuffleNet flatten to ``[1, K]``; ViT's attention
      reshapes to ``[heads, T, d]`` at batch 1, torchvision's to ``[T, heads, d]``);
    - Expand of a constant (a class token) whose result joins the batch: the batch dim becomes ``N``;
    - a constant of batch 1 concatenated with batch-carrying tensors on another axis is expanded to N;
    - Resize to constant sizes: the batch's size becomes N.
    """
    from ..graph import infer_shapes

    g = model.graph
    image = next((vi for vi in g.input if vi.name == ctx.image_input), None)
    if image is None or (dims(image) or [None])[0] != 1:  # exported with a free (or larger) batch
        return 0
    known = infer_shapes(model)
    measured: dict[str, list[int]] = {}

    def shape_of(name):
        if name in measured:
            return measured[name]
        if name in known:
            found = dims(known[name])
            return found if known[name].type.tensor_type.HasField("shape") else None
        value = constant_value(g, name)
        return None if value is None else list(value.shape)

    unknown = [o for n in g.node if n.op_type not in _SHAPE_OPS for o in n.output
               if o and (shape_of(o) is None or None in shape_of(o))]
    if unknown and any(n.op_type == "Reshape" for n in g.node):
        # shapes computed at run time (Swin pads to whole windows): measured at batch 1
        measured.update(measured_shapes(model, ctx.image_input, unknown))

    axis_of: dict[str, tuple[int, int]] = {ctx.image_input: (0, 1)}
    for node in g.node:
        if node.op_type in _SHAPE_OPS:
            continue
        found = [(k, *axis_of[i]) for k, i in enumerate(node.input) if i in axis_of]
        if not found:
            continue
        if node.op_type in _RECURRENT:
            axis_of.update(_recurrent_axes(node, *found[0]))
            continue
        out = _output_axis(g, node, *found[0], shape_of)
        if out is not None:
            for o in node.output:
                if o:
                    axis_of[o] = out
    users, producer = consumers(g), producers(g)
    b = _Builder(g, ctx.image_input)
    new_nodes, changed = [], 0
    for node in g.node:
        before = []
        if node.op_type == "Reshape" and node.input[0] in axis_of and node.output[0] in axis_of:
            j = axis_of[node.output[0]][0]
            shape = _shape_constant(g, node.input[1] if len(node.input) > 1 else "")
            if shape is not None and j < len(shape) and int(shape[j]) not in (0, -1):
                if -1 in shape:
                    node.input[1] = b.scaled_shape(shape, j, before)
                else:  # the element count tells the batch dim
                    shape[j] = -1
                    node.input[1] = b.const(f"{node.input[1]}__any_batch", shape)
                changed += 1
            elif shape is None and node.input[1] in producer and producer[node.input[1]].op_type == "Concat":
                changed += _free_concat_piece(g, producer[node.input[1]], j, b, shape_of)
        elif node.op_type == "Gather" and node.input[0] in axis_of and node.output[0] in axis_of and \
                _strided_view(g, node, *axis_of[node.input[0]], shape_of(node.input[0])) is not None:
            node.input[1] = _per_image_indices(g, node, shape_of(node.input[0])[0], b, before)
            changed += 1
        elif node.op_type == "Resize" and node.input[0] in axis_of and len(node.input) > 3:
            sizes = _shape_constant(g, node.input[3])  # output sizes, batch included (mobilevit, dynamo)
            j = axis_of[node.input[0]][0]
            if sizes is not None and j < len(sizes) and int(sizes[j]) == 1:
                node.input[3] = b.scaled_shape(sizes, j, before)
                changed += 1
        elif node.op_type in _RECURRENT and node.input[0] in axis_of:
            changed += _free_initial_states(g, node, b, before, axis_of, producer)
        elif node.op_type in _BROADCASTING and node.output[0] in axis_of:
            changed += _uniform_constants_broadcast(g, node, b, axis_of, shape_of)
        elif node.op_type == "Expand" and node.input[0] not in axis_of:
            shape = _shape_constant(g, node.input[1])
            j = _joined_axis(node.output[0], len(shape) if shape is not None else 0, users, axis_of, shape_of)
            if shape is not None and j is not None and int(shape[j]) == 1:
                node.input[1] = b.scaled_shape(shape, j, before)
                changed += 1
        elif node.op_type == "Concat" and node.output[0] in axis_of:
            j = axis_of[node.output[0]][0]
            axis = attribute(node, "axis", 0)
            for k, name in enumerate(node.input):
                # a constant, or a tensor computed from constants alone (a class token behind DequantizeLinear)
                shape = shape_of(name) if name not in axis_of else None
                if not shape or len(shape) <= j or shape[j] != 1 or axis % len(shape) == j:
                    continue
                expanded = b.name(f"{name}__batch")
                before.append(helper.make_node(
                    "Expand", [name, b.scaled_shape(np.ones(len(shape), np.int64), j, before)], [expanded]))
                node.input[k] = expanded
                changed += 1
        new_nodes += before + [node]
    if changed:
        del g.node[:]
        g.node.extend(b.prologue + new_nodes)
    return changed


_RECURRENT = ("LSTM", "GRU", "RNN")


def _recurrent_axes(node, k: int, a: int, o: int) -> dict[str, tuple[int, int]]:
    """A recurrent node whose sequence X carries the batch on its batch axis: Y (sequence, directions,
    batch, hidden; batch first with layout=1) and the final states (directions, batch, hidden) carry it
    too. The batch on the time or feature axis (or on a state alone): nothing is followed."""
    layout = attribute(node, "layout", 0)
    if k != 0 or a != (0 if layout else 1):
        return {}
    axes = {}
    for i, name in enumerate(node.output):
        if name:
            axes[name] = ((0 if layout else 2) if i == 0 else (0 if layout else 1), o)
    return axes


def _free_initial_states(g, node, b: "_Builder", nodes: list, axis_of, producer) -> int:
    """Initial states (inputs 5 and 6) held as constants of the exported batch, every value the same
    (the dynamo exporter's zeros): expanded to the run's batch on their batch axis. The legacy
    exporter's ``Expand(zeros of the exported batch, [D, batch from the sequence's shape, H])`` keeps
    its computed target, from a constant of ones dims (zeros of 8 rows do not expand to 16)."""
    j = 0 if attribute(node, "layout", 0) else 1
    changed = 0
    for k in (5, 6):
        name = node.input[k] if len(node.input) > k else ""
        source = producer.get(name)
        if source is not None and source.op_type == "Expand" and constant_value(g, source.input[1]) is None:
            fill = constant_value(g, source.input[0])
            if fill is not None and fill.ndim == 3 and fill.size and np.all(fill == fill.flat[0]) and \
                    fill.shape[j] != 1:
                source.input[0] = b.const(f"{source.input[0]}__fill", np.full((1, 1, 1), fill.flat[0], fill.dtype))
                changed += 1
            continue
        value = constant_value(g, name) if name and name not in axis_of else None
        if value is None or value.ndim != 3 or not value.size or not np.all(value == value.flat[0]):
            continue
        fill = b.const(f"{name}__fill", np.full((1, 1, 1), value.flat[0], value.dtype))
        expanded = b.name(f"{name}__batch")
        nodes.append(helper.make_node("Expand", [fill, b.scaled_shape(np.asarray(value.shape, np.int64), j, nodes)],
                                      [expanded]))
        node.input[k] = expanded
        changed += 1
    return changed


_BROADCASTING = ("Add", "Sub", "Mul", "Div", "Max", "Min", "Where", "Pow")


def _uniform_constants_broadcast(g, node, b: "_Builder", axis_of, shape_of) -> int:
    """A constant meeting a batch-carrying tensor in a broadcasting op with the exported batch's size on
    the batch axis, every value the same along it (the dynamo exporter folds ``zeros(batch, H) @ W + b``
    of an unrolled RNN into rows that are all ``b``): reduced to one row there, which broadcasts to any
    batch."""
    j_out, _ = axis_of[node.output[0]]
    rank_out = len(shape_of(node.output[0]) or [])
    carrier = next((shape_of(i) for i in node.input if i in axis_of), None)
    at = None if not carrier else j_out - (rank_out - len(carrier))  # broadcasting aligns the last axes
    if at is None or not 0 <= at < len(carrier) or carrier[at] is None:
        return 0
    changed = 0
    for k, name in enumerate(node.input):
        if not name or name in axis_of:
            continue
        value = constant_value(g, name)
        if value is None or not rank_out or value.ndim == 0:
            continue
        j = j_out - (rank_out - value.ndim)
        if not 0 <= j < value.ndim or value.shape[j] <= 1 or value.shape[j] != carrier[at]:
            continue  # the batch-carrying input gives the output its size there, not the constant
        first = np.take(value, [0], axis=j)
        if not np.array_equal(np.broadcast_to(first, value.shape), value):
            continue
        node.input[k] = b.const(f"{name}__one_row", first)
        changed += 1
    return changed


def _strided_view(g, node, a: int, o: int, s_in) -> np.ndarray | None:
    """The constant indices of a Gather that picks, from one image's elements flattened to 1-D, a view of
    them (the dynamo exporter's ``as_strided``, indices of shape (1, ...)); None for any other Gather."""
    if a != 0 or o != 1 or s_in is None or len(s_in) != 1 or s_in[0] is None or attribute(node, "axis", 0) != 0:
        return None
    indices = constant_value(g, node.input[1])
    if indices is None or indices.ndim < 1 or indices.shape[0] != 1 or indices.dtype.kind not in "iu":
        return None
    return indices if 0 <= int(indices.min()) and int(indices.max()) < s_in[0] else None


def _per_image_indices(g, node, size: int, b: "_Builder", nodes: list) -> str:
    """``as_strided`` for a batch: image n's indices are image 0's plus n times one image's size."""
    indices = constant_value(g, node.input[1]).astype(np.int64)
    start, step = b.const("free_batch__zero", np.array(0, np.int64)), b.const("free_batch__one", np.array(1, np.int64))
    count, images, offsets = b.name("free_batch__count"), b.name("free_batch__images"), b.name("free_batch__offsets")
    shaped, out = b.name("free_batch__offsets_shaped"), b.name("free_batch__indices")
    nodes += [
        helper.make_node("Squeeze", [b.batch, b.const("free_batch__axis0", np.array([0], np.int64))], [count]),
        helper.make_node("Range", [start, count, step], [images]),
        helper.make_node("Mul", [images, b.const("free_batch__size", np.array(size, np.int64))], [offsets]),
        helper.make_node("Reshape", [offsets, b.const("free_batch__column", np.array([-1] + [1] * (indices.ndim - 1), np.int64))], [shaped]),
        helper.make_node("Add", [b.const(f"{node.input[1]}__image0", indices), shaped], [out]),
    ]
    return out


def _free_concat_piece(g, concat: onnx.NodeProto, j: int, b: _Builder, shape_of) -> int:
    """A Reshape target assembled at run time from pieces: dim ``j`` becomes -1 (the element count tells
    it) where no other piece is -1: a constant piece holds the exported batch, and a computed one may
    too (Swin's ``B * num_windows`` multiplies the batch, folded to 1, by computed counts). Else a
    constant piece is multiplied by the batch size, and a computed one left as it is."""
    pieces = []
    for name in concat.input:
        value = constant_value(g, name)
        length = int(np.asarray(value).size) if value is not None else (shape_of(name) or [None])[0]
        if length is None:
            return 0
        pieces.append((name, value, length))
    free = not any(value is not None and -1 in np.asarray(value).ravel() for _, value, _ in pieces)
    position = 0
    for k, (name, value, length) in enumerate(pieces):
        if position <= j < position + length:
            if value is None:
                if not free or length != 1:
                    return 0
                concat.input[k] = b.const(f"{name}__any_batch", np.array([-1], np.int64))
                return 1
            piece = np.asarray(value, np.int64).ravel().copy()
            if int(piece[j - position]) in (0, -1):
                return 0
            if free:
                piece[j - position] = -1
                concat.input[k] = b.const(f"{name}__any_batch", piece)
            else:  # computed from constants and the batch alone: before every node, where the Concat reads it
                concat.input[k] = b.scaled_shape(piece, j - position, b.prologue)
            return 1
        position += length
    return 0


def _joined_axis(name, rank, users, axis_of, shape_of) -> int | None:
    """The batch axis of a batch-carrying tensor that ``name`` (of ``rank``) meets in a consumer,
    aligned to ``name``'s axes as broadcasting aligns them."""
    for user in users.get(name, []):
        for other in user.input:
            if other in axis_of and other != name:
                s = shape_of(other)
                if s is None:
                    continue
                j = axis_of[other][0] - (len(s) - rank)
                if 0 <= j < rank:
                    return j
    return None
