"""Passes that rewrite single operators onnx2torch cannot convert, or converts in a way gradient methods
cannot use, into exact equivalents it can."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ConversionError
from ..graph import (attribute, clip_bound, constant_value, consumers, dims, infer_shapes, is_large,
                           measured_dims, opset, outer_reads, subgraph_reads, subgraphs, without_weight_data)
from .passes import register


def _fresh(g: onnx.GraphProto, base: str) -> str:
    taken = {o for n in g.node for o in n.output} | {t.name for t in g.initializer} | {i.name for i in g.input}
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


def _const(g: onnx.GraphProto, base: str, value: np.ndarray) -> str:
    name = _fresh(g, base)
    g.initializer.append(numpy_helper.from_array(value, name))
    return name


def _replace_nodes(g: onnx.GraphProto, replacements: dict[int, list[onnx.NodeProto]]) -> None:
    nodes = []
    for i, node in enumerate(g.node):
        nodes.extend(replacements.get(i, [node]))
    del g.node[:]
    g.node.extend(nodes)


@register("opset-upgrade", targets=("torch",), order=2)
def opset_upgrade(model: onnx.ModelProto, ctx) -> int:
    """Old opsets (zoo models are opset 7-9) → opset 13, for which onnx2torch has converters."""
    if opset(model) >= 11:
        return 0
    from onnx import version_converter

    # The converter serialises the whole model; weights are never changed by it, so they travel as
    # empty shells (dims kept for shape inference) and are put back afterwards (VGG19: 10 s -> 0.1 s).
    weights = {t.name: t for t in model.graph.initializer if is_large(t)}
    try:
        upgraded = version_converter.convert_version(without_weight_data(model), 13)
    except Exception as exc:
        raise ConversionError(f"cannot upgrade the graph from opset {opset(model)} to 13: {exc}") from None
    # the upgraded structure around the model's own weight tensors, which are never copied (VGG19's
    # 575 MB would be held three times at once)
    g, ug = model.graph, upgraded.graph
    for field in ("node", "input", "output", "value_info"):
        del getattr(g, field)[:]
        getattr(g, field).extend(getattr(ug, field))
    small = [i for i, t in enumerate(g.initializer) if t.name not in weights]
    for i in reversed(small):
        del g.initializer[i]
    g.initializer.extend(t for t in ug.initializer if t.name not in weights)
    del model.opset_import[:]
    model.opset_import.extend(upgraded.opset_import)
    # opset 13 needs IR version 7, which also lets initializers stand apart from the graph inputs
    model.ir_version = max(model.ir_version, 7)
    return 1


@register("stale-shapes", targets=("torch",), order=11)
def stale_shapes(model: onnx.ModelProto, ctx) -> int:
    """Intermediate shapes recorded in the file (``value_info``) are dropped; shape inference gives them
    afresh, from the normalised graph (a wrong or stale record, e.g. of another rank, would otherwise
    win over inference and mislead the passes that read shapes). 'dynamic-batch' does it too, except
    where a graph keeps its exported batch of 1."""
    count = len(model.graph.value_info)
    del model.graph.value_info[:]
    return count


@register("remove-dropout", targets=("torch",), order=30)
def remove_dropout(model: onnx.ModelProto, ctx) -> int:
    """Dropout is the identity at inference; its mask output must be unused."""
    g = model.graph
    outputs = {o.name for o in g.output}
    used = consumers(g)
    replacements = {}
    for i, node in enumerate(g.node):
        if node.op_type != "Dropout":
            continue
        if len(node.output) > 1 and node.output[1] and (node.output[1] in used or node.output[1] in outputs):
            raise ConversionError(f"Dropout node {node.name or node.output[0]!r} has its mask used.")
        replacements[i] = [helper.make_node("Identity", [node.input[0]], [node.output[0]], name=node.name)]
    _replace_nodes(g, replacements)
    return len(replacements)


_AUTO_PADDED = ("Conv", "ConvTranspose", "ConvInteger", "MaxPool", "AveragePool", "LpPool")


@register("auto-pad", targets=("torch",), order=38)
def auto_pad(model: onnx.ModelProto, ctx) -> int:
    """``auto_pad`` (SAME_UPPER, SAME_LOWER, VALID; JAX and TensorFlow exports use SAME) → the explicit
    ``pads`` onnxruntime computes: for an output of ceil(in / stride), SAME pads ``total = (out - 1) *
    stride + (kernel - 1) * dilation + 1 - in`` (at least 0), the odd pixel at the end (SAME_UPPER) or
    the beginning (SAME_LOWER); VALID pads nothing. At stride 1 the pads do not depend on the input's
    size; else its spatial size is read from shape inference, or measured in onnxruntime. Asymmetric
    pads are then handled exactly as exported ones are: onnx2torch pads a Conv's input with zeros
    first, the 'asymmetric-pool' pass does it for pools."""
    g = model.graph
    changed, sizes = 0, None
    for node in g.node:
        mode = attribute(node, "auto_pad", b"NOTSET")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if node.op_type not in _AUTO_PADDED or mode == "NOTSET":
            continue
        kernel = _kernel(g, node)
        if kernel is None:
            continue
        rank = len(kernel)
        strides = list(attribute(node, "strides", [1] * rank))
        dilations = list(attribute(node, "dilations", [1] * rank))
        if mode == "VALID":
            pads = [0] * 2 * rank
        elif node.op_type == "ConvTranspose":  # the output is in * stride: the pads do not depend on in
            extra = list(attribute(node, "output_padding", [0] * rank))
            totals = [max(0, extra[i] + (kernel[i] - 1) * dilations[i] + 1 - strides[i]) for i in range(rank)]
            if any(t % 2 for t in totals):
                continue  # asymmetric: onnx2torch's ConvTranspose has none; refused by name
            pads = _split_pads(totals, mode)
        else:
            spatial = [None] * rank
            if any(s != 1 for s in strides):
                sizes = sizes if sizes is not None else _spatial_sizes(model, ctx)
                spatial = (sizes.get(node.input[0]) or [None] * (rank + 2))[2:]
                if len(spatial) != rank or None in spatial:
                    continue  # left to the attribute check, which refuses it by name
            totals = []
            for i in range(rank):
                span = (kernel[i] - 1) * dilations[i] + 1
                if strides[i] == 1:
                    totals.append(span - 1)
                else:
                    out = -(-spatial[i] // strides[i])
                    totals.append(max(0, (out - 1) * strides[i] + span - spatial[i]))
            pads = _split_pads(totals, mode)
        kept = [a for a in node.attribute if a.name not in ("auto_pad", "pads")]
        del node.attribute[:]
        node.attribute.extend(kept + [helper.make_attribute("pads", pads)])
        changed += 1
    return changed


def _kernel(g: onnx.GraphProto, node: onnx.NodeProto) -> list[int] | None:
    kernel = attribute(node, "kernel_shape")
    if kernel is not None:
        return list(kernel)
    weight = next((t for t in g.initializer if len(node.input) > 1 and t.name == node.input[1]), None)
    return list(weight.dims[2:]) if weight is not None else None


def _split_pads(totals: list[int], mode: str) -> list[int]:
    """ONNX pads (all begins, then all ends): the odd pixel at the end for SAME_UPPER, at the beginning
    for SAME_LOWER."""
    small = [t // 2 for t in totals]
    large = [t - t // 2 for t in totals]
    return small + large if mode == "SAME_UPPER" else large + small


def _spatial_sizes(model: onnx.ModelProto, ctx) -> dict[str, list]:
    """Inferred shapes of every tensor, with those inference left without a full shape measured in
    onnxruntime at batch 1 (at ``ctx.image_shape`` where the graph's own input size is symbolic)."""
    known = {name: dims(vi) for name, vi in infer_shapes(model).items() if vi.type.tensor_type.HasField("shape")}
    wanted = [n.input[0] for n in model.graph.node if n.op_type in _AUTO_PADDED and n.input
              and (n.input[0] not in known or None in known[n.input[0]][2:])]
    if wanted:
        image = next(vi for vi in model.graph.input if vi.name == ctx.image_input)
        size = list(ctx.image_shape) if ctx.image_shape else dims(image)
        known.update(measured_dims(model, ctx.image_input, wanted, [1, *size[1:]]))
    return known


@register("asymmetric-pool", targets=("torch",), order=40)
def asymmetric_pool(model: onnx.ModelProto, ctx) -> int:
    """AveragePool/MaxPool with begin != end pads (zoo GoogLeNet's final 7x7 average, SAME pads made
    explicit by 'auto-pad') or pads over half the kernel (which torch's pools refuse) → explicit Pad and
    a pool without pads, keeping ONNX semantics exactly: MaxPool pads with the lowest float;
    AveragePool divides by the number of pixels each window counts (the real ones, or with
    count_include_pad=1 the padded ones too), as a ratio of two average pools (values over counts).
    With ceil_mode, onnxruntime keeps a last window only where it starts before the end padding, which
    a pool over the padded tensor cannot tell: the input's size (inferred, else measured) gives the
    output's, ceil_mode becomes floor mode over an end pad long enough for those windows, and the extra
    pixels count for nothing."""
    g = model.graph
    replacements, sizes = {}, None
    for i, node in enumerate(g.node):
        if node.op_type not in ("AveragePool", "MaxPool"):
            continue
        pads = list(attribute(node, "pads", []) or [])
        auto_pad = attribute(node, "auto_pad", b"NOTSET")
        if auto_pad not in (b"NOTSET", "NOTSET"):
            continue
        half = len(pads) // 2
        kernel = list(attribute(node, "kernel_shape", []) or [])
        if not pads or (pads[:half] == pads[half:] and all(p <= k // 2 for p, k in zip(pads, kernel))):
            continue  # torch pools pad symmetrically, by at most half the kernel
        if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1]:
            continue  # indices output: refused by the converter
        extra = [0] * half
        if attribute(node, "ceil_mode", 0):
            sizes = sizes if sizes is not None else _spatial_sizes(model, ctx)
            spatial = (sizes.get(node.input[0]) or [None] * (half + 2))[2:]
            if len(spatial) != half or None in spatial:
                continue  # the converter refuses the asymmetric pads by name
            extra = _ceil_extra(node, spatial, pads)
        replacements[i] = _padded_pool(g, node, pads, extra)
    _replace_nodes(g, replacements)
    return len(replacements)


def _ceil_extra(node: onnx.NodeProto, spatial: list[int], pads: list[int]) -> list[int]:
    """Per axis, the end padding a floor-mode pool needs beyond ``pads`` to give the windows
    onnxruntime's ceil mode gives."""
    half = len(spatial)
    kernel = list(attribute(node, "kernel_shape"))
    strides = list(attribute(node, "strides", [1] * half))
    dilations = list(attribute(node, "dilations", [1] * half))
    extra = []
    for a in range(half):
        span = (kernel[a] - 1) * dilations[a] + 1
        padded = spatial[a] + pads[a] + pads[a + half]
        out = -(-(padded - span) // strides[a]) + 1
        if (out - 1) * strides[a] >= spatial[a] + pads[a]:  # a last window in the end padding only
            out -= 1
        extra.append(max(0, (out - 1) * strides[a] + span - padded))
    return extra


def _padded_pool(g: onnx.GraphProto, node: onnx.NodeProto, pads: list[int], extra: list[int]) -> list:
    """Nodes computing ``node`` as a pool without pads (in floor mode) over its explicitly padded input."""
    half = len(pads) // 2
    x, y = node.input[0], node.output[0]

    def spec(begin, end):
        return _const(g, f"{y}__pads", np.array([0, 0, *begin, 0, 0, *end], np.int64))

    ends = [p + e for p, e in zip(pads[half:], extra)]
    total = spec(pads[:half], ends)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name not in ("pads", "ceil_mode")}
    padded = _fresh(g, f"{y}__padded")
    if node.op_type == "MaxPool":
        low = _const(g, f"{y}__low", np.array(np.finfo(np.float32).min, np.float32))
        return [helper.make_node("Pad", [x, total, low], [padded], mode="constant"),
                helper.make_node("MaxPool", [padded], [y], name=node.name, **attrs)]
    include = attrs.pop("count_include_pad", 0)
    new = [helper.make_node("Pad", [x, total], [padded], mode="constant")]
    if include and not any(extra):
        return new + [helper.make_node("AveragePool", [padded], [y], name=node.name, **attrs)]
    shape, ones, counted, summed, count = (_fresh(g, f"{y}__{s}") for s in ("shape", "ones", "counted", "sum", "count"))
    new += [helper.make_node("Shape", [x], [shape]),
            helper.make_node("ConstantOfShape", [shape], [ones], value=numpy_helper.from_array(np.ones(1, np.float32)))]
    if include:  # the pads count, the extra does not
        one = _const(g, f"{y}__one", np.array(1.0, np.float32))
        inner = _fresh(g, f"{y}__ones_padded")
        new += [helper.make_node("Pad", [ones, spec(pads[:half], pads[half:]), one], [inner], mode="constant"),
                helper.make_node("Pad", [inner, spec([0] * half, extra)], [counted], mode="constant")]
    else:
        new.append(helper.make_node("Pad", [ones, total], [counted], mode="constant"))
    return new + [helper.make_node("AveragePool", [padded], [summed], **attrs),
                  helper.make_node("AveragePool", [counted], [count], **attrs),
                  helper.make_node("Div", [summed, count], [y], name=node.name)]


@register("relu6-as-relu", targets=("torch",), order=50)
def relu6_as_relu(model: onnx.ModelProto, ctx) -> int:
    """Clip(min=0, max=m) → Relu then Clip(0, m): the same function, and ReLU-based methods (guided
    backpropagation, Captum's GuidedBackprop) see the ReLU inside ReLU6. (Not Min: onnx2torch's Min
    stacks broadcast copies and doubles the backward time.)"""
    g = model.graph
    replacements = {}
    for i, node in enumerate(g.node):
        if node.op_type != "Clip":
            continue
        low = clip_bound(g, node, "min")
        high = clip_bound(g, node, "max")
        if low is None or float(low) != 0.0:
            continue
        relu_out = _fresh(g, f"{node.output[0]}__relu")
        new = [helper.make_node("Relu", [node.input[0]], [relu_out], name=f"{node.name}__relu")]
        if high is not None and np.isfinite(high):
            cap = _const(g, f"{node.output[0]}__max", np.array(high, np.float32))
            floor = _const(g, f"{node.output[0]}__min", np.array(0.0, np.float32))
            new.append(helper.make_node("Clip", [relu_out, floor, cap], [node.output[0]], name=node.name))
        else:
            new[0].output[0] = node.output[0]
        replacements[i] = new
    _replace_nodes(g, replacements)
    return len(replacements)


@register("float-image-input", targets=("torch",), order=60)
def float_image_input(model: onnx.ModelProto, ctx) -> int:
    """A uint8 image input becomes float (its values are still 0..255) so gradients reach the pixels;
    the graph's own Cast to float then passes the values through."""
    for vi in model.graph.input:
        if vi.name == ctx.image_input and vi.type.tensor_type.elem_type == onnx.TensorProto.UINT8:
            vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
            return 1
    return 0


NOT_DIFFERENTIABLE = {"ArgMax", "ArgMin", "Floor", "Ceil", "Round", "Sign", "Equal", "Greater", "Less",
                      "GreaterOrEqual", "LessOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf",
                      "NonZero", "TopK"}
_NO_VALUE_FLOW = {"Shape", "Size", "ConstantOfShape", "EyeLike", "SequenceLength"}
_INTEGER_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32,
                  onnx.TensorProto.INT64, onnx.TensorProto.UINT8, onnx.TensorProto.UINT16,
                  onnx.TensorProto.UINT32, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL}


#: the inputs whose values flow into the output (where an op has others: a condition that selects,
#: indices, target shapes, pads, sizes); a mask computed from the image (HF ViT's dynamo export masks
#: attention with Where(IsNaN(p), 0, p)) then lies off the value path
_VALUE_INPUTS = {"Where": (1, 2), "Gather": (0,), "GatherElements": (0,), "GatherND": (0,), "ScatterND": (0, 2),
                 "ScatterElements": (0, 2), "Reshape": (0,), "Expand": (0,), "Tile": (0,), "Slice": (0,),
                 "Pad": (0, 2), "Resize": (0,), "Upsample": (0,), "TopK": (0,), "CumSum": (0,), "Squeeze": (0,),
                 "Unsqueeze": (0,), "ReduceMean": (0,), "ReduceSum": (0,), "ReduceMax": (0,), "ReduceMin": (0,),
                 "SequenceAt": (0,), "SequenceInsert": (0, 1), "SequenceErase": (0,), "SplitToSequence": (0,)}


def _value_inputs(node: onnx.NodeProto) -> list[str]:
    """The inputs whose values flow into the outputs; for control flow what the subgraphs read from
    around them and a Loop's initial carried values, not the trip count or a condition (which choose)."""
    if node.op_type in ("If", "Loop", "Scan"):
        first = {"If": 1, "Loop": 2, "Scan": 0}[node.op_type]
        return [i for i in node.input[first:] if i] + subgraph_reads(node)
    positions = _VALUE_INPUTS.get(node.op_type)
    return [i for k, i in enumerate(node.input) if i and (positions is None or k in positions)]


def _no_gradient(node: onnx.NodeProto) -> bool:
    return node.op_type in NOT_DIFFERENTIABLE or (node.op_type == "Cast" and attribute(node, "to") in _INTEGER_TYPES)


def _blocked(nodes, carries: set, needed: set):
    """The first of ``nodes`` on the value path from ``carries`` to ``needed`` with no gradient, looking
    into subgraphs (a Loop body's carried values and what it reads from around it that carries)."""
    carries, needed = set(carries), set(needed)
    for node in nodes:
        if node.op_type not in _NO_VALUE_FLOW and any(i in carries for i in _value_inputs(node)):
            carries.update(o for o in node.output if o)
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            needed.update(_value_inputs(node))
    for node in nodes:
        if not (any(i in carries for i in _value_inputs(node)) and any(o in needed for o in node.output)):
            continue
        if _no_gradient(node):
            return node
        for sub in subgraphs(node):
            inner = {i for i in outer_reads(sub) if i in carries}
            if node.op_type == "Loop":  # body inputs: iteration, condition, carried values
                inner |= {v.name for v, init in zip(sub.input[2:], node.input[2:]) if init in carries}
            outputs = [o.name for o in sub.output][1 if node.op_type == "Loop" else 0:]
            found = _blocked(list(sub.node), inner, set(outputs))
            if found is not None:
                return found
    return None


def check_differentiable(model: onnx.ModelProto, image: str, score: str) -> None:
    """Raise ConversionError naming the first node on the image → score value path with no gradient
    (inside subgraphs too)."""
    node = _blocked(list(model.graph.node), {image}, {score})
    if node is not None:
        raise ConversionError(
            f"node {node.name or node.output[0]!r} ({node.op_type}) lies on the path from the image "
            "to the class score and has no gradient; gradient methods cannot run on this graph. "
            "Occlusion sensitivity and LIME (forward-only) still work.")


@register("reshape-allowzero", targets=("torch",), order=55)
def reshape_allowzero(model: onnx.ModelProto, ctx) -> int:
    """Reshape's ``allowzero=1`` (the dynamo exporter sets it everywhere) differs from the default only
    for a 0 in the target shape: constant targets without a 0, and targets computed from the sizes of
    real tensors (never 0 in a classifier), convert as ``allowzero=0``, which onnx2torch handles."""
    g = model.graph
    changed = 0
    for node in g.node:
        if node.op_type != "Reshape" or not attribute(node, "allowzero", 0):
            continue
        shape = constant_value(g, node.input[1])
        if shape is not None and 0 in np.asarray(shape).ravel():
            continue
        for a in node.attribute:
            if a.name == "allowzero":
                a.i = 0
        changed += 1
    return changed


@register("trailing-empty-inputs", targets=("torch",), order=56)
def trailing_empty_inputs(model: onnx.ModelProto, ctx) -> int:
    """Optional inputs left empty at the end (``Clip(x, min, "")`` from F.normalize's clamp) are dropped:
    the same node in ONNX, and onnx2torch looks the empty name up as a constant and fails."""
    changed = 0
    for node in model.graph.node:
        while len(node.input) > 1 and not node.input[-1]:
            del node.input[-1]
            changed += 1
    return changed


@register("fold-zero-pads", targets=("runtime",), order=20)
def fold_zero_pads(model: onnx.ModelProto, ctx=None) -> int:
    """Zero ``Pad`` nodes read by one ``Conv`` alone folded into that Conv's ``pads``, in place; returns
    how many. The same function: a Conv pads with zeros. onnxruntime 1.31 keeps such a Pad (TensorFlow's
    "SAME" padding of a stride-2 convolution, e.g. EfficientNet-Lite0's stem and its 5 stride-2 depthwise
    convolutions) as a node of its own, with NCHWc layout reorders around it (measured 18 % of
    Lite0's single-thread run on the 2-core machine, the maps bit-identical); OpenVINO folds it itself."""
    graph = model.graph
    if any(subgraphs(n) for n in graph.node):
        return 0  # subgraphs may read the graph's names: left as it is
    constants = {t.name: t for t in graph.initializer}
    constants.update({n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant" and n.output
                      and len(n.attribute) == 1 and n.attribute[0].name == "value"})

    def value(name: str):
        return numpy_helper.to_array(constants[name]) if name in constants else None

    readers = consumers(graph)
    outputs = {o.name for o in graph.output}
    folded = set()
    for pad in graph.node:
        if pad.op_type != "Pad" or pad.domain not in ("", "ai.onnx") or pad.output[0] in outputs:
            continue
        conv = readers.get(pad.output[0], [])
        if len(conv) != 1 or conv[0].op_type != "Conv" or conv[0].domain not in ("", "ai.onnx") \
                or conv[0].input[0] != pad.output[0]:
            continue
        conv = conv[0]
        if attribute(pad, "mode", b"constant") not in (b"constant", "constant") or len(pad.input) < 2 \
                or pad.input[1] not in constants or (len(pad.input) > 3 and pad.input[3]):
            continue
        if len(pad.input) > 2 and pad.input[2] and (pad.input[2] not in constants or np.any(value(pad.input[2]) != 0)):
            continue
        pads = value(pad.input[1]).astype(np.int64).ravel()
        rank = len(pads) // 2
        if rank < 3 or np.any(pads < 0) or pads[0] or pads[1] or pads[rank] or pads[rank + 1]:
            continue
        if attribute(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue
        spatial = rank - 2
        old = list(attribute(conv, "pads", [0] * (2 * spatial)))
        new = [int(old[i] + pads[2 + i]) for i in range(spatial)] + \
              [int(old[spatial + i] + pads[rank + 2 + i]) for i in range(spatial)]
        kept = [a for a in conv.attribute if a.name != "pads"]
        del conv.attribute[:]
        conv.attribute.extend(kept + [helper.make_attribute("pads", new)])
        conv.input[0] = pad.input[0]
        folded.add(id(pad))
    if folded:
        read = {i for n in graph.node if id(n) in folded for i in n.input[1:]}
        kept = [n for n in graph.node if id(n) not in folded]
        del graph.node[:]
        graph.node.extend(kept)
        # the folded Pads' own constants, where nothing else reads them (nor lists them as an input)
        used = {i for n in kept for i in n.input} | outputs | {i.name for i in graph.input}
        if any(name not in used for name in read):
            weights = [t for t in graph.initializer if t.name in used or t.name not in read]
            del graph.initializer[:]
            graph.initializer.extend(weights)
    return len(folded)
