"""Reading facts from an ONNX graph: constants, producers and consumers, tensor types and shapes.

Everything here is pure inspection of a ``ModelProto``; nothing is executed and no string from the
graph is ever evaluated.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

FLOAT_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
               onnx.TensorProto.DOUBLE: np.float64}
IMAGE_TYPES = {**FLOAT_TYPES, onnx.TensorProto.UINT8: np.uint8}


def initializer_names(graph: onnx.GraphProto) -> set[str]:
    return {t.name for t in graph.initializer}


def real_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that must be fed at run time: not weights (old IR versions list weights as inputs
    too) and used by some node (Caffe2 exports carry unused queue inputs)."""
    inits = initializer_names(graph)
    used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
    return [i for i in graph.input if i.name not in inits and i.name in used]


def dims(value_info: onnx.ValueInfoProto) -> list:
    """Static dims as ints, symbolic or unknown ones as None."""
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim]


def elem_type(value_info: onnx.ValueInfoProto) -> int:
    return value_info.type.tensor_type.elem_type


def constant_value(graph: onnx.GraphProto, name: str):
    """The value of tensor ``name`` if it is an initializer or a Constant node's output, else None."""
    for t in graph.initializer:
        if t.name == name:
            return _value(t)
    for node in graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value":
                    return _value(attr.t)
    return None


def _value(t: onnx.TensorProto):
    """A tensor's value; None for one still stored in an external file (numpy_helper would read it
    relative to the working directory, outside the checks of model.load)."""
    return None if t.data_location == onnx.TensorProto.EXTERNAL else numpy_helper.to_array(t)


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output if out}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Name -> the nodes that read it, as an input or from inside their subgraphs (an If's branches, a
    Loop's body)."""
    found: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in dict.fromkeys(reads(node)):
            if name:
                found[name].append(node)
    return found


def reads(node: onnx.NodeProto) -> list[str]:
    """Every name ``node`` reads: its inputs, then what its subgraphs read from the graph around them."""
    return [*node.input, *subgraph_reads(node)] if node.attribute else list(node.input)


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs ``node`` holds: an If's branches, a Loop's or Scan's body (none for other ops)."""
    return [g for a in node.attribute for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs)]


def all_nodes(graph: onnx.GraphProto):
    """The graph's nodes and those of every subgraph in it, depth first."""
    for node in graph.node:
        yield node
        for g in subgraphs(node):
            yield from all_nodes(g)


def opset(model: onnx.ModelProto, domain: str = "") -> int:
    for imp in model.opset_import:
        if imp.domain in (domain, "ai.onnx" if domain == "" else domain):
            return imp.version
    return 1


def attribute(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def clip_bound(graph: onnx.GraphProto, node: onnx.NodeProto, which: str) -> float | None:
    """A Clip node's ``which`` ("min" or "max") bound, from its input (opset >= 11) or attribute:
    -inf for an absent min, None for an absent max or one computed at run time."""
    index = 1 if which == "min" else 2
    if len(node.input) > index and node.input[index]:
        value = constant_value(graph, node.input[index])
        return None if value is None else float(np.asarray(value).ravel()[0])
    value = attribute(node, which)
    if value is None:
        return float("-inf") if which == "min" else None
    return float(value)


def layer_name(node: onnx.NodeProto) -> str:
    """What users call a node: its name, or its first output's name when the exporter left it empty."""
    return node.name or (node.output[0] if node.output else "")


def is_large(t: onnx.TensorProto) -> bool:
    count = 1
    for d in t.dims:
        count *= d
    return count > 256


def without_weight_data(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose large initializers keep name, type and dims but no data: what shape inference and
    version conversion need, at a fraction of the serialisation cost."""
    shell = onnx.ModelProto(ir_version=model.ir_version, producer_name=model.producer_name)
    shell.opset_import.extend(model.opset_import)
    g, sg = model.graph, shell.graph
    sg.name = g.name
    sg.node.extend(g.node)
    sg.input.extend(g.input)
    sg.output.extend(g.output)
    sg.value_info.extend(g.value_info)
    for t in g.initializer:
        if is_large(t):
            s = sg.initializer.add()
            s.name, s.data_type = t.name, t.data_type
            s.dims.extend(t.dims)
        else:
            sg.initializer.add().CopyFrom(t)
    return shell


def infer_shapes(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Type and shape of every tensor that onnx's shape inference can tell (never raises)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(without_weight_data(model), strict_mode=False,
                                                     data_prop=True)
    except Exception:  # inference is best effort; callers fall back to 'unknown'
        inferred = model
    g = inferred.graph
    known = {vi.name: vi for vi in list(g.value_info) + list(g.input) + list(g.output)}
    for t in g.initializer:
        known.setdefault(t.name, onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return known


def measured_shapes(model: onnx.ModelProto, image: str, names: list[str]) -> dict[str, list[int]]:
    """The shapes of tensors ``names`` in one onnxruntime run on zeros of the input's declared shape;
    {} where that cannot run (the caller's own checks say why)."""
    vi = next(v for v in model.graph.input if v.name == image)
    shape = dims(vi)
    if None in shape:
        return {}
    return _measured(model, image, names, [shape])[0]


def measured_dims(model: onnx.ModelProto, image: str, names: list[str], size: list | None = None) -> dict[str, list]:
    """The shapes of tensors ``names`` measured in onnxruntime on zeros, with None for each dim that
    depends on the batch: where the image's batch is free, the graph runs at batch 1 and 2 and dims
    that differ are None. ``size`` gives the image's other dims where the graph declares them symbolic
    (an export with dynamic height and width); {} where the graph cannot run so."""
    vi = next(v for v in model.graph.input if v.name == image)
    shape = dims(vi)
    if size is not None and len(size) == len(shape):
        shape = [d if d is not None else s for d, s in zip(shape, size)]
    if not shape or None in shape[1:]:
        return {}
    if shape[0] is not None:
        return {n: list(v) for n, v in _measured(model, image, names, [shape])[0].items()}
    one, two = _measured(model, image, names, [[1, *shape[1:]], [2, *shape[1:]]])
    return {n: [a if a == b else None for a, b in zip(one[n], two[n])]
            for n in one if n in two and len(one[n]) == len(two[n])}


def _measured(model: onnx.ModelProto, image: str, names: list[str], shapes: list[list[int]]) -> list[dict]:
    """Tensor name → shape, for each input shape in ``shapes`` (one session, one run each); empty dicts
    where the graph cannot run."""
    import onnxruntime as ort

    vi = next(v for v in model.graph.input if v.name == image)
    if elem_type(vi) not in IMAGE_TYPES or not names:
        return [{} for _ in shapes]
    names = list(dict.fromkeys(names))
    outputs = model.graph.output
    declared = len(outputs)
    outputs.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in
                   {o.name for o in outputs})
    try:  # outputs added for the serialisation only: the weights are not copied
        data = model.SerializeToString()
    finally:
        del outputs[declared:]
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        return [{n: list(v.shape) for n, v in zip(names, session.run(names, {image: np.zeros(shape, IMAGE_TYPES[elem_type(vi)])}))}
                for shape in shapes]
    except Exception:  # the probe in Classifier reports what fails
        return [{} for _ in shapes]


def head_nodes(graph: onnx.GraphProto, feature: str, scores, roots=(), *, take=None) -> tuple[list, list[str]]:
    """(nodes, reads): the head of ``graph`` from tensor ``feature`` (and ``roots``) to ``scores`` (a
    tensor name, or several: a scores output and the logits before its Softmax): the nodes on paths from
    ``feature`` or ``roots`` to the scores, in graph order, and the tensors where the walk stopped, sorted:
    what computing the scores needs from outside those nodes (``feature`` among them, the weights, what
    the graph computes around the head; a score tensor that the head does not compute itself; the names
    that a node's subgraphs read from the graph count as the node's inputs).

    The walk goes back from the scores and stops at ``feature`` and ``roots`` (their producers are not
    in the head). A node the walk meets that ``feature`` and ``roots`` do not reach (a weight's
    Identity, a Shape, the residual stream around the feature) is left out by default, the tensor it
    gives being read from the graph as it is: what a copy of the head inside the same graph wants
    (export's ``Head``). ``take(node, tensor)``, called for such a node giving ``tensor``, True takes the
    node into the head instead, and the walk goes on through what it reads: what a head run as a model
    of its own wants for tensors computed from constants (Recipro-CAM's two-stage head,
    ``methods.recipro_cam.head_cut``, which takes every node but those of image-dependent tensors and
    Shape(image))."""
    producer = producers(graph)
    starts = {feature, *roots}
    reached, downstream = set(starts), set()
    for node in graph.node:
        if any(i in reached for i in reads(node)):
            downstream.add(id(node))
            reached.update(o for o in node.output if o)
    taken, stops, seen = set(), set(), set()
    todo = [scores] if isinstance(scores, str) else list(scores)
    while todo:
        name = todo.pop()
        if not name or name in seen:
            continue
        seen.add(name)
        node = producer.get(name)
        if name in starts or node is None or not (id(node) in downstream or (take is not None and take(node, name))):
            stops.add(name)
            continue
        if id(node) not in taken:
            taken.add(id(node))
            todo.extend(reads(node))
    return [n for n in graph.node if id(n) in taken], sorted(stops)


def subgraph_reads(node: onnx.NodeProto) -> list[str]:
    """The names that ``node``'s subgraphs (an If's branches, a Loop's or Scan's body) read from the
    graph around them."""
    return [name for g in subgraphs(node) for name in outer_reads(g)]


def outer_reads(graph: onnx.GraphProto) -> list[str]:
    """The names a subgraph reads from the graph around it, in order of use (repeated where read
    again): what its nodes read that it neither computes nor takes as inputs or weights."""
    inner = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    return [i for n in graph.node for i in reads(n) if i and i not in inner]
