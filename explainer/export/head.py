"""The head: the nodes on paths from the feature tensor to the score tensor, a copy of them for the
explanation branch, and its reverse-mode differentiation with the rules of ``rules.py``.

Only nodes on paths from the feature to the score are copied and differentiated; every other tensor
they read (weights, the residual stream before the feature, shapes) is read from the graph as it is
and is a constant for the gradient. The copy keeps the original nodes untouched, so the model's own
outputs are computed exactly as before; its tensors are renamed under ``explain/fwd/``."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import UnsupportedHeadOpError, UnsupportedModelError
from ..graph import producers
from .errors import RECIPRO_HINT
from .rules import RULES

#: ops whose outputs never carry a gradient (shapes, comparisons, indices)
NON_DIFFERENTIABLE = {"Shape", "Size", "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Not", "And",
                      "Or", "Xor", "ArgMax", "ArgMin", "NonZero", "ConstantOfShape", "Range", "EyeLike",
                      "Floor", "Ceil", "Round", "Sign", "IsNaN", "IsInf"}
FLOAT_TYPES = (np.float32, np.float16, np.float64)
#: integer outputs that carry a gradient: the straight-through estimator of quantisation
STRAIGHT_THROUGH = {"QuantizeLinear", "DequantizeLinear"}


class Head:
    def __init__(self, graph: onnx.GraphProto, feature: str, scores: str):
        self.graph, self.feature, self.scores = graph, feature, scores
        producer = producers(graph)
        reached = {feature}
        for n in graph.node:
            if any(i in reached for i in n.input):
                reached.update(o for o in n.output if o)
        needed, stack = set(), [scores]
        while stack:
            t = stack.pop()
            if t in needed or t == feature:
                continue
            needed.add(t)
            n = producer.get(t)
            if n is not None:
                stack.extend(i for i in n.input if i)
                stack.extend(_subgraph_inputs(n))
        self.nodes = [n for n in graph.node if any(o in reached and o in needed for o in n.output)]
        self.found = scores in reached
        for n in self.nodes:
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
                raise UnsupportedHeadOpError(
                    f"export: the head holds a {n.op_type} node with a subgraph ({n.name!r}); no gradient rule "
                    f"covers control flow. {RECIPRO_HINT}.")
        #: tensors computed by the head (renamed in a copy)
        self.tensors = {o for n in self.nodes for o in n.output if o}
        self.inputs = {i for n in self.nodes for i in n.input if i and i not in self.tensors}

    def copy(self, ctx, new_feature: str, tag: str = "fwd", inputs: dict | None = None) -> dict:
        """Copy the head's nodes into ``ctx.graph``, reading ``new_feature`` for the feature (and
        ``inputs[t]`` for other tensors ``t`` it reads, where given); returns {original tensor: copied
        tensor} (the scores' copy is ``mapping[ctx.scores]``)."""
        mapping = dict(inputs or {})
        mapping[self.feature] = new_feature
        for t in sorted(self.tensors):
            mapping[t] = ctx.name(f"{tag}/{t.split('/')[-1] or 't'}")
            ctx.known(mapping[t], t)  # the copy's tensors are the originals'
        for n in self.nodes:
            copied = onnx.NodeProto()
            copied.CopyFrom(n)
            copied.name = ctx.name(f"{tag}/node")
            del copied.input[:]
            copied.input.extend(mapping.get(i, i) if i else "" for i in n.input)
            del copied.output[:]
            copied.output.extend(mapping[o] if o else "" for o in n.output)
            ctx.graph.node.append(copied)
        return mapping


def _subgraph_inputs(node) -> list[str]:
    names = []
    for a in node.attribute:
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            names.extend(i for n in g.node for i in n.input if i)
    return names


def constant_values(graph: onnx.GraphProto) -> dict:
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute:
            a = n.attribute[0]
            if a.name == "value":
                values[n.output[0]] = numpy_helper.to_array(a.t)
            elif a.name in ("value_int", "value_ints", "value_float", "value_floats"):
                values[n.output[0]] = np.asarray(onnx.helper.get_attribute_value(a))
    return values


class Backward:
    """What rules see: the context, the forward copy's names, shapes, constants; see ``rules``."""

    def __init__(self, ctx, head: Head, mapping: dict, constants: dict):
        self.ctx, self.head, self.mapping, self.constants = ctx, head, mapping, constants
        self.differentiable = {head.feature}
        for n in head.nodes:
            if n.op_type in NON_DIFFERENTIABLE:
                continue
            if n.op_type == "Cast" and not _is_float(ctx.np_dtype(n.output[0])):
                continue
            if n.op_type in STRAIGHT_THROUGH:  # its first input to its (integer or float) output
                if n.input[0] in self.differentiable:
                    self.differentiable.add(n.output[0])
            elif any(i in self.differentiable for i in n.input):
                self.differentiable.update(o for o in n.output if o and _is_float(ctx.np_dtype(o)))
        self._needs: dict = {}
        #: gradients that are one-hot over the scores' classes: {gradient: (K, N) int64 class indices}
        #: (the seed; a rule that passes a gradient on unchanged keeps its name): a Gemm or MatMul with
        #: constant weights then gathers the classes' weights instead of multiplying by the one-hot
        self.onehot: dict = {}

    def fwd(self, tensor: str) -> str:
        return self.mapping.get(tensor, tensor)

    def needs(self, node, i: int) -> bool:
        return i < len(node.input) and node.input[i] in self.differentiable

    def shape(self, tensor: str):
        return self.ctx.shape(tensor)

    def rank(self, tensor: str) -> int:
        return self.ctx.rank(tensor)

    def value(self, tensor: str):
        if tensor in self.constants:
            return self.constants[tensor]
        return self.ctx.values.get(tensor)

    def reshape_like(self, g: str, x: str) -> str:
        return self.ctx.reshape_like(g, x, self.fwd(x))

    def zeros_like(self, y: str, grads) -> str:
        any_g = next(g for g in grads if g is not None)
        zero = self.ctx.const(np.zeros((), self.ctx.np_dtype(y)), "zero")
        return self.ctx.node("Expand", [zero, self.ctx.kshape(any_g, self.fwd(y))])

    def unbroadcast(self, g: str, x: str, shape=None) -> str:
        """Sum ``g`` (K, *shape: by default the current node's output shape) back to (K, *shape of x)."""
        xs = self.shape(x)
        gs = tuple(shape) if shape is not None else self._out_shape
        if xs is None or gs is None:
            raise UnsupportedHeadOpError(f"export: the shape of {x!r} in the head is unknown")
        lead = len(gs) - len(xs)
        axes = list(range(1, 1 + lead))
        axes += [1 + lead + i for i, (a, c) in enumerate(zip(xs, gs[lead:])) if a == 1 and c != 1]
        if not axes:
            return g
        summed = self.ctx.reduce("ReduceSum", g, axes, keepdims=1)
        return self.reshape_like(summed, x)

    def run(self, seed: str, classes: str | None = None) -> str:
        """The gradient (K, *feature shape) of the seeded scores with respect to the feature;
        ``classes``: where the seed (K, N, classes) is one-hot, its (K, N) class indices."""
        ctx, head = self.ctx, self.head
        if classes is not None:
            self.onehot[seed] = classes
        grads: dict[str, list[str]] = {head.scores: [seed]}
        for node in reversed(head.nodes):
            outs = [_total(ctx, grads.get(o)) if o else None for o in node.output]
            if all(g is None for g in outs):
                continue
            if not any(i in self.differentiable for i in node.input):
                continue
            fn = RULES.get(node.op_type)
            if fn is None:
                error = UnsupportedHeadOpError(
                    f"export: the head (feature layer → scores) holds a {node.op_type} node "
                    f"({node.name or node.output[0]!r}), which has no gradient rule, so Grad-CAM cannot be "
                    f"written as a graph. {RECIPRO_HINT}.")
                error.op_type = node.op_type  # for the library's choice of engine (export.engine)
                raise error
            self._out_shape = ctx.shape(node.output[0])
            result = fn(self, node, outs)
            for i, g in zip(node.input, result):
                if g is not None and i in self.differentiable:
                    grads.setdefault(i, []).append(g)
        total = _total(ctx, grads.get(head.feature))
        if total is None:
            raise UnsupportedModelError("export: the scores do not depend on the feature layer through "
                                        "differentiable ops; pick another feature_layer.")
        return total


def _total(ctx, names):
    if not names:
        return None
    if len(names) == 1:
        return names[0]
    return ctx.node("Sum", names)


def _is_float(dtype) -> bool:
    return np.dtype(dtype).type in FLOAT_TYPES


def measure(model: onnx.ModelProto, feeds: dict, names, *, batch_axes: dict | None = None,
            other_feeds: dict | None = None) -> tuple[dict, dict, dict]:
    """(shapes, dtypes, small integer values) of tensors ``names`` of ``model`` on ``feeds``: one
    onnxruntime run with them as extra outputs (initializers are read from the graph). With
    ``other_feeds`` (another batch size) and a dict ``batch_axes``, a second run fills ``batch_axes``
    with each tensor's axes whose extent differs between the two runs (those that follow the batch)."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    initialisers = {t.name: t for t in probe.graph.initializer}
    existing = {o.name for o in probe.graph.output}
    inputs = {i.name for i in probe.graph.input}
    wanted = sorted(set(names) - set(initialisers) - existing - inputs)
    for name in wanted:
        probe.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    out_names = [o.name for o in session.get_outputs()]
    shapes, dtypes, values = {}, {}, {}
    arrays = dict(zip(out_names, session.run(out_names, feeds)))
    arrays.update({k: v for k, v in feeds.items()})
    if other_feeds is not None and batch_axes is not None:
        others = dict(zip(out_names, session.run(out_names, other_feeds)))
        others.update(other_feeds)
        for name, value in arrays.items():
            a, o = np.shape(value), np.shape(others[name])
            if len(a) == len(o):
                batch_axes[name] = frozenset(i for i, (p, q) in enumerate(zip(a, o)) if p != q)
        for t in initialisers.values():
            batch_axes[t.name] = frozenset()
    for name, value in arrays.items():
        value = np.asarray(value)
        shapes[name], dtypes[name] = tuple(value.shape), value.dtype
        if value.dtype.kind in "iu" and value.size <= 64:
            values[name] = value
    for name, t in initialisers.items():
        shapes[name] = tuple(t.dims)
        dtypes[name] = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
    return shapes, dtypes, values


def gradient_model(model: onnx.ModelProto, wrt: str, of: str, feeds: dict) -> onnx.ModelProto:
    """A copy of ``model`` with one more output, ``gradient``: d sum(``of``) / d ``wrt`` written by the
    rules (how tests check each rule against torch.autograd on a tiny graph)."""
    from .context import ExportContext

    out = onnx.ModelProto()
    out.CopyFrom(model)
    opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 1)
    ctx = ExportContext(out.graph, opset, wrt, None, of, 0, ir_version=out.ir_version)
    head = Head(out.graph, wrt, of)
    ctx.shapes, ctx.dtypes, ctx.values = measure(model, feeds, head.tensors | head.inputs | {wrt})
    mapping = head.copy(ctx, wrt)
    seed = ctx.const(np.ones((1, *ctx.shape(of)), ctx.np_dtype(of)), "seed")
    gradient = Backward(ctx, head, mapping, constant_values(out.graph)).run(seed)
    ctx.node("Squeeze", [gradient] + ([ctx.const(np.asarray([0], np.int64), "axes")]
                                                                 if opset >= 13 else []),
             outputs=["gradient"], **({} if opset >= 13 else {"axes": [0]}))
    out.graph.output.append(onnx.helper.make_tensor_value_info("gradient", ctx.elem_type(wrt), list(ctx.shape(wrt))))
    return out
