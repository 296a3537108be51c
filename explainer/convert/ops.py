"""Passes that rewrite single operators onnx2torch cannot convert, or converts in a way gradient methods
cannot use, into exact equivalents it can."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ConversionError
from ..model.graph import (attribute, clip_bound, constant_value, consumers, dims, infer_shapes, is_large, opset,
                           without_weight_data)
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


@register("asymmetric-pool", targets=("torch",), order=40)
def asymmetric_pool(model: onnx.ModelProto, ctx) -> int:
    """AveragePool/MaxPool with begin != end pads (zoo GoogLeNet's final 7x7 average) → explicit Pad and
    a pool without pads, keeping ONNX semantics exactly: MaxPool pads with -inf; AveragePool with
    count_include_pad=0 divides by the number of real pixels in each window (pooled ones mask)."""
    g = model.graph
    replacements, shapes = {}, None
    for i, node in enumerate(g.node):
        if node.op_type not in ("AveragePool", "MaxPool"):
            continue
        pads = list(attribute(node, "pads", []) or [])
        auto_pad = attribute(node, "auto_pad", b"NOTSET")
        if auto_pad not in (b"NOTSET", "NOTSET"):
            continue
        half = len(pads) // 2
        if not pads or pads[:half] == pads[half:]:
            continue
        if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1]:
            continue  # indices output: leave it to the converter
        x, y = node.input[0], node.output[0]
        pad_spec = _const(g, f"{y}__pads", np.array([0, 0, *pads[:half], 0, 0, *pads[half:]], np.int64))
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name not in ("pads",)}
        new = []
        if node.op_type == "MaxPool":
            low = _const(g, f"{y}__low", np.array(np.finfo(np.float32).min, np.float32))
            padded = _fresh(g, f"{y}__padded")
            new += [helper.make_node("Pad", [x, pad_spec, low], [padded], mode="constant"),
                    helper.make_node("MaxPool", [padded], [y], name=node.name, **attrs)]
        else:
            include = attrs.pop("count_include_pad", 0)
            padded = _fresh(g, f"{y}__padded")
            new.append(helper.make_node("Pad", [x, pad_spec], [padded], mode="constant"))
            if include:
                new.append(helper.make_node("AveragePool", [padded], [y], name=node.name, **attrs))
            else:
                shape, ones, ones_p, summed, count = (_fresh(g, f"{y}__{s}") for s in
                                                      ("shape", "ones", "ones_padded", "sum", "count"))
                new += [helper.make_node("Shape", [x], [shape]),
                        helper.make_node("ConstantOfShape", [shape], [ones],
                                         value=numpy_helper.from_array(np.ones(1, np.float32))),
                        helper.make_node("Pad", [ones, pad_spec], [ones_p], mode="constant"),
                        helper.make_node("AveragePool", [padded], [summed], **attrs),
                        helper.make_node("AveragePool", [ones_p], [count], **attrs),
                        helper.make_node("Div", [summed, count], [y], name=node.name)]
        replacements[i] = new
        # onnx's shape inference loses the rank after a Pad whose input dims are symbolic, and
        # onnx2torch needs it: record the padded shapes, computed from the input's known shape.
        if shapes is None:
            shapes = infer_shapes(model)
        known = dims(shapes[x]) if x in shapes else []
        if len(known) == half + 2:
            padded_shape = [known[0] or "N", known[1]] + [
                None if d is None else d + pads[k] + pads[k + half] for k, d in enumerate(known[2:])]
            for n in new:
                if n.op_type == "Pad":
                    g.value_info.append(helper.make_tensor_value_info(
                        n.output[0], onnx.TensorProto.FLOAT, [d if d is not None else f"{n.output[0]}_{j}"
                                                              for j, d in enumerate(padded_shape)]))
    _replace_nodes(g, replacements)
    return len(replacements)


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
_NO_VALUE_FLOW = {"Shape", "Size", "ConstantOfShape", "EyeLike"}
_INTEGER_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32,
                  onnx.TensorProto.INT64, onnx.TensorProto.UINT8, onnx.TensorProto.UINT16,
                  onnx.TensorProto.UINT32, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL}


def check_differentiable(model: onnx.ModelProto, image: str, score: str) -> None:
    """Raise ConversionError naming the first node on the image → score value path with no gradient."""
    g = model.graph
    carries = {image}
    for node in g.node:
        if node.op_type in _NO_VALUE_FLOW:
            continue
        if any(i in carries for i in node.input):
            carries.update(o for o in node.output if o)
    needed = {score}
    for node in reversed(g.node):
        if any(o in needed for o in node.output):
            needed.update(i for i in node.input if i)
    for node in g.node:
        on_path = any(i in carries for i in node.input) and any(o in needed for o in node.output)
        if not on_path:
            continue
        bad = node.op_type in NOT_DIFFERENTIABLE or (
            node.op_type == "Cast" and attribute(node, "to") in _INTEGER_TYPES)
        if bad:
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
