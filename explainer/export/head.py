"""The head: the nodes on paths from the feature tensor to the score tensor, a copy of them for the
explanation branch, and its reverse-mode differentiation with the rules of ``rules.py``; on token
layers, the head that picks its class token as early as the ops allow (``select_early``,
``early_head``: a ViT's last block then runs its MLP and attention queries on one token).

Only nodes on paths from the feature to the score are copied and differentiated; every other tensor
they read (weights, the residual stream before the feature, shapes) is read from the graph as it is
and is a constant for the gradient. The copy keeps the original nodes untouched, so the model's own
outputs are computed exactly as before; its tensors are renamed under ``explain/fwd/``."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import UnsupportedHeadOpError, UnsupportedModelError
from ..graph import attribute, constant_value, consumers, dims, head_nodes, infer_shapes, producers, subgraphs
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
    """The nodes on paths from ``feature`` to ``scores`` in ``graph`` (with ``roots``: from those tensors
    too: the head of ``early_head``, whose Slices of the residual stream belong to the head):
    ``graph.head_nodes``, every other tensor they read being read from the graph as it is."""

    def __init__(self, graph: onnx.GraphProto, feature: str, scores: str, roots=()):
        self.graph, self.feature, self.scores = graph, feature, scores
        # the nodes the feature (and roots) reach; what they read from elsewhere is read as it is
        self.nodes, reads = head_nodes(graph, feature, scores, roots)
        self.found = scores in (feature, *roots) or any(scores in n.output for n in self.nodes)
        for n in self.nodes:
            if subgraphs(n):
                raise UnsupportedHeadOpError(
                    f"export: the head holds a {n.op_type} node with a subgraph ({n.name!r}): the exported "
                    "branch copies the head's nodes, and copies no control flow (for either method). Pick a "
                    "feature_layer after that node; at this layer the library explains in Python "
                    "(explainer.gradcam on the torch module, explainer.recipro_cam in two stages).")
        #: tensors computed by the head (renamed in a copy)
        self.tensors = {o for n in self.nodes for o in n.output if o}
        #: tensors the head's nodes read from the graph (the feature, weights, the residual stream,
        #: shapes); none where it has no nodes (the scores are the feature, or do not depend on it)
        self.inputs = set(reads) if self.nodes else set()

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


def constant_values(graph: onnx.GraphProto) -> dict:
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute:
            a = n.attribute[0]
            if a.name == "value":
                values[n.output[0]] = numpy_helper.to_array(a.t)
            elif a.name in ("value_int", "value_ints", "value_float", "value_floats"):
                values[n.output[0]] = np.asarray(onnx.helper.get_attribute_value(a))
        elif n.op_type == "Identity" and n.input and n.input[0] in values:  # a weight shared under two names
            values[n.output[0]] = values[n.input[0]]
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
            other_feeds: dict | None = None, arrays: dict | None = None) -> tuple[dict, dict, dict]:
    """(shapes, dtypes, small integer values) of tensors ``names`` of ``model`` on ``feeds``: one
    onnxruntime run with them as extra outputs (initializers are read from the graph). With
    ``other_feeds`` (another batch size) and a dict ``batch_axes``, a second run fills ``batch_axes``
    with each tensor's axes whose extent differs between the two runs (those that follow the batch);
    ``arrays``: a dict whose keys name tensors, filled with their values on the first run."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    initialisers = {t.name: t for t in probe.graph.initializer}
    existing = {o.name for o in probe.graph.output}
    inputs = {i.name for i in probe.graph.input}
    wanted = sorted((set(names) | set(arrays or ())) - set(initialisers) - existing - inputs)
    for name in wanted:
        probe.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    out_names = [o.name for o in session.get_outputs()]
    shapes, dtypes, values = {}, {}, {}
    got = dict(zip(out_names, session.run(out_names, feeds)))
    got.update(feeds)
    if arrays is not None:
        arrays.update({k: got[k] for k in arrays if k in got})
    if other_feeds is not None and batch_axes is not None:
        others = dict(zip(out_names, session.run(out_names, other_feeds)))
        others.update(other_feeds)
        for name, value in got.items():
            a, o = np.shape(value), np.shape(others[name])
            if len(a) == len(o):
                batch_axes[name] = frozenset(i for i, (p, q) in enumerate(zip(a, o)) if p != q)
        for t in initialisers.values():
            batch_axes[t.name] = frozenset()
    for name, value in got.items():
        value = np.asarray(value)
        shapes[name], dtypes[name] = tuple(value.shape), value.dtype
        if value.dtype.kind in "iu" and value.size <= 64:
            values[name] = value
    for name, t in initialisers.items():
        shapes[name] = tuple(t.dims)
        dtypes[name] = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
    return shapes, dtypes, values


def integer_values(model: onnx.ModelProto, shapes: dict | None = None) -> dict:
    """The small integer tensors of ``model`` (shapes, Reshape targets: ``measure``'s ``values``) on one
    onnxruntime run of zero inputs, one image: each input at its shape in ``shapes`` ({name: shape}),
    else at its declared one with a symbolic axis taken as 1; what ``select_early`` reads for Reshape
    targets computed from Shapes. {} where the graph cannot run so (nothing is read then)."""
    feeds = {}
    for i in model.graph.input:
        if i.name in {t.name for t in model.graph.initializer}:
            continue
        t = i.type.tensor_type
        shape = (shapes or {}).get(i.name) or [d.dim_value if d.HasField("dim_value") else 1 for d in t.shape.dim]
        feeds[i.name] = np.zeros(shape, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
    names = {o for n in model.graph.node for o in n.output if o}
    try:
        return measure(model, feeds, names)[2]
    except Exception:  # noqa: BLE001 - a head that cannot run on zeros here: no values read
        return {}


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


# the head reading its class token early ------------------------------------------------------------------------
#: ops that compute each token from that token alone (given constant weights)
TOKENWISE_UNARY = {"Erf", "Gelu", "Relu", "Sigmoid", "Tanh", "Sqrt", "Reciprocal", "Identity", "Cast", "Dropout",
                   "Clip", "HardSigmoid", "HardSwish", "Neg", "Abs", "Exp", "Log", "Softplus", "LeakyRelu", "Elu",
                   "Mish", "FastGelu", "BiasGelu"}
TOKENWISE_BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"}


def select_early(model: onnx.ModelProto, layout, values: dict | None = None) -> onnx.ModelProto | None:
    """A copy of a token head that reads one token (a class token, ``Gather(axis=1)`` of a constant index)
    where it picks that token as early as the ops allow: back through ops that commute with picking one
    token (elementwise ops, LayerNorms and Softmaxes over other axes, MatMuls along their rows,
    Transposes and Reshapes that keep the token axis whole, whose target then holds 1 token), as long as
    every reader of a tensor is such an op; where the walk stops, the tensor is sliced to the token. On a
    ViT's last block the MLP, the projection, the norms and the attention's query rows then run on the
    class token alone. The same function of the same values; None where the head does not read a token
    that way. ``layout``: the feature layer's ``FeatureLayout``; ``values``: measured values of computed
    integer tensors (a Reshape target built from Shapes, as a dynamic-batch export writes it: its token
    entry is then set to 1 in the graph, the other entries computed as before)."""
    graph = model.graph
    known = infer_shapes(model)
    consts = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    producer, readers = producers(graph), consumers(graph)
    tokens = layout.prefix + layout.grid[0] * layout.grid[1]

    def shape(name):
        vi = known.get(name)
        return dims(vi) if vi is not None else None

    def is_tokens(name):
        d = shape(name)
        return d is not None and len(d) == 3 and d[1] == tokens

    def carries(name, axis):
        d = shape(name)
        return d is not None and 0 <= axis < len(d) and d[axis] == tokens

    def step(node, a: int):
        """{input: its token axis} when ``node`` commutes with picking one token along output axis ``a``
        (the inputs listed are picked too, the others read whole); None when it does not."""
        out = node.output[0]
        rank = len(shape(out) or [])
        data = [i for i in node.input if i]
        if len(node.output) != 1 or not carries(out, a):
            return None
        op = node.op_type
        if op in TOKENWISE_UNARY:
            return {data[0]: a} if carries(data[0], a) and all(i in consts for i in data[1:]) else None
        if op in TOKENWISE_BINARY:
            picked = {}
            for i in data:
                d = shape(i)
                if d is None:
                    return None
                ai = a - (rank - len(d))
                if ai >= 0 and d[ai] == tokens:
                    picked[i] = ai
                elif ai >= 0 and d[ai] != 1:
                    return None
            return picked or None
        if op in ("LayerNormalization", "Softmax"):
            axis = attribute(node, "axis", -1)
            axis = axis + rank if axis < 0 else axis
            ok = axis > a and carries(data[0], a) and all(i in consts for i in data[1:])
            return {data[0]: a} if ok else None
        if op == "ReduceMean" and len(data) == 1:  # a decomposed LayerNorm (opset < 18)
            axes = [x + rank if x < 0 else x for x in attribute(node, "axes", [])]
            ok = axes and a not in axes and attribute(node, "keepdims", 1) == 1 and carries(data[0], a)
            return {data[0]: a} if ok else None
        if op == "MatMul":  # rows of the product are rows of the left operand
            d = shape(data[0])
            if d is None or rank < 2 or a != rank - 2:
                return None
            ai = a - (rank - len(d))
            return {data[0]: ai} if carries(data[0], ai) else None
        if op == "Transpose":
            perm = attribute(node, "perm")
            return {data[0]: perm[a]} if perm is not None and carries(data[0], perm[a]) else None
        if op == "Reshape":
            target = constant_value(graph, data[1]) if data[1] in consts else (values or {}).get(data[1])
            din, dout = shape(data[0]), shape(out)
            if target is None or din is None or dout is None or a == 0 or int(target[a]) != tokens:
                return None
            before = np.prod([x for x in dout[1:a]], dtype=np.int64) if None not in dout[1:a] else None
            for j in range(1, len(din)):
                if din[j] == tokens and None not in din[1:j] and np.prod(din[1:j], dtype=np.int64) == before:
                    reshapes[id(node)] = a
                    return {data[0]: j}
            return None
        return None

    selects = [n for n in graph.node if n.op_type == "Gather" and attribute(n, "axis", 0) == 1 and is_tokens(n.input[0])
               and n.input[1] in consts]
    if len(selects) != 1:
        return None
    select = selects[0]
    index = constant_value(graph, select.input[1])
    if index is None or index.ndim != 0 or not 0 <= int(index) < tokens:
        return None
    reshapes: dict[int, int] = {}  # id of a Reshape in the region -> the token axis of its target
    region, frontier, changed = {id(select)}, {select.input[0]: 1}, True
    while changed:
        changed = False
        for t, a in sorted(frontier.items()):
            node = producer.get(t)
            if node is None or any(id(c) not in region for c in readers.get(t, [])):
                continue
            picked = step(node, a)
            if picked is None:
                reshapes.pop(id(node), None)
                continue
            if any(i in frontier and frontier[i] != ai for i, ai in picked.items()):
                return None  # one tensor picked along two axes: leave the head whole
            region.add(id(node))
            del frontier[t]
            frontier.update(picked)
            changed = True
            break
    if len(region) == 1:
        return None
    k = int(index)
    zero = "recipro_early/zero"
    renamed = {t: f"recipro_early/{t}" for t in sorted(frontier)}
    constants = [onnx.numpy_helper.from_array(np.asarray(0, np.int64), zero),
                 onnx.numpy_helper.from_array(np.asarray([k], np.int64), "recipro_early/starts"),
                 onnx.numpy_helper.from_array(np.asarray([k + 1], np.int64), "recipro_early/ends")]
    for a in sorted(set(frontier.values())):
        constants.append(onnx.numpy_helper.from_array(np.asarray([a], np.int64), f"recipro_early/axis{a}"))

    def slice_of(t):
        return helper.make_node("Slice", [t, "recipro_early/starts", "recipro_early/ends", f"recipro_early/axis{frontier[t]}"],
                                [renamed[t]], name=f"recipro_early/slice:{t}")

    nodes = [slice_of(t) for t in sorted(frontier) if t not in producer]  # of the head's inputs
    for n in graph.node:
        copied = onnx.NodeProto()
        copied.CopyFrom(n)
        if id(n) in region:
            copied.input[:] = [renamed.get(i, i) for i in n.input]
            if n is select:
                copied.input[1] = zero
            if id(n) in reshapes and n.input[1] in consts:  # the target's token count becomes 1
                target = constant_value(graph, n.input[1]).astype(np.int64).copy()
                target[reshapes[id(n)]] = 1
                name = f"recipro_early/target:{n.output[0]}"
                constants.append(onnx.numpy_helper.from_array(target, name))
                copied.input[1] = name
            elif id(n) in reshapes:  # computed: target * (1 - e_a) + e_a, e_a the token entry's unit vector
                unit = np.zeros(len(values[n.input[1]]), np.int64)
                unit[reshapes[id(n)]] = 1
                keep, one, scaled = (f"recipro_early/{k}:{n.output[0]}" for k in ("keep", "one", "scaled"))
                constants += [onnx.numpy_helper.from_array(1 - unit, keep), onnx.numpy_helper.from_array(unit, one)]
                nodes += [helper.make_node("Mul", [n.input[1], keep], [scaled], name=scaled),
                          helper.make_node("Add", [scaled, one], [f"recipro_early/target:{n.output[0]}"],
                                           name=f"recipro_early/target:{n.output[0]}")]
                copied.input[1] = f"recipro_early/target:{n.output[0]}"
        nodes.append(copied)
        nodes.extend(slice_of(o) for o in n.output if o in renamed)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(constants)
    return out


def early_head(model: onnx.ModelProto, head: Head, layout, shapes: dict, dtypes: dict, dynamic: dict,
               values: dict, prefix: str) -> tuple[list, list, str, list[str]] | None:
    """``head`` of ``model`` (a token layer's) as ``select_early`` rewrites it, to be added to ``model``'s
    graph: (nodes, new initializers, the scores tensor, the tensors it reads from the graph), every
    tensor it computes or adds renamed under ``prefix``; None where the head does not read one token
    early. ``shapes``, ``dtypes``, ``dynamic``, ``values``: the measured shapes, dtypes, batch axes and
    small integer values of the head's tensors (the rewritten head's inputs are declared with them;
    computed Reshape targets are read from them)."""
    graph = model.graph
    constants = constant_values(graph)
    reads = sorted(t for t in head.inputs if t not in constants and t != head.feature)
    if head.feature not in shapes or any(t not in shapes for t in reads):
        return None

    def info(name: str):
        batch = dynamic.get(name, frozenset())
        shape = ["N" if i in batch else int(d) for i, d in enumerate(shapes[name])]
        return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtypes[name])), shape)

    used = {i for n in head.nodes for i in n.input if i in constants}
    sub = helper.make_graph([n for n in head.nodes], "head", [info(head.feature)] + [info(t) for t in reads],
                            [helper.make_tensor_value_info(head.scores, helper.np_dtype_to_tensor_dtype(
                                np.dtype(dtypes.get(head.scores, np.float32))), None)],
                            initializer=[numpy_helper.from_array(np.asarray(constants[t]), t) for t in sorted(used)])
    whole = helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    whole.functions.extend(model.functions)
    early = select_early(whole, layout, values)
    if early is None:
        return None
    inputs = {head.feature, *reads}
    outside = inputs | {t.name for t in graph.initializer} | set(constants)
    added = [t for t in early.graph.initializer if t.name not in used]
    renamed = {t.name: prefix + t.name for t in added}
    renamed.update({o: prefix + o for n in early.graph.node for o in n.output if o and o not in outside})
    nodes = []
    for n in early.graph.node:
        copied = onnx.NodeProto()
        copied.CopyFrom(n)
        copied.input[:] = [renamed.get(i, i) for i in n.input]
        copied.output[:] = [renamed.get(o, o) for o in n.output]
        copied.name = prefix + (n.name or n.output[0])
        nodes.append(copied)
    initializers = [numpy_helper.from_array(numpy_helper.to_array(t), renamed[t.name]) for t in added]
    return nodes, initializers, renamed[head.scores], [head.feature, *reads]
