"""Recipro-CAM as a graph: the library's ``recipro_cam`` (explainer/methods/recipro_cam.py) at its
defaults (point masks on feature maps, the 3 x 3 Gaussian on tokens; softmax probabilities; each map
min-max scaled), written into the model as a side branch.

The feature tensor (N, ...) is tiled h*w times with the location masks, (N, h*w, ...) → (N*h*w, ...),
and a copy of the head's nodes (renamed; on tokens, of the head that picks the class token early,
``ctx.early_head()``) computes the scores of every masked copy (where the head
starts with a GlobalAveragePool of the feature map, the copies are its h*w pooled vectors instead,
each location's vector / (h*w), read by the head after the pool); the Softmax of the
copies' scores, reshaped to (N, classes, h*w), gives each explained class's map by GatherElements with
``ctx.classes``; each map is min-max scaled (0 where constant) and laid out (N, K, h, w).

On token layers the head also reads the tensors around the feature layer that the library masks with
it (a ViT's residual stream, the input of the block's first LayerNorm): they are tiled with the same
masks and read by the copy instead of the originals. The head's other inputs (weights, constants) are
read from the graph as they are.

The copies ride on the batch axis, so constants of the head that hold the batch size (Reshape targets
of a graph exported for batch 1) would not fit N*h*w rows: such a Reshape target's first entry is
rewritten to -1 (or 0 with allowzero=0 where -1 is taken); a target that cannot be freed so is refused,
naming the fix (export the model with a dynamic batch axis).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import UnsupportedModelError
from ..graph import constant_value
from ..runtime.feature_layers import location_masks
from ..model.structure import image_reads
from . import exporter
from .context import ExportContext


def _mask_constant(ctx: ExportContext, layout, dtype) -> str:
    """(1, h*w, *per-image feature shape) masks in the feature's layout: location k's mask broadcast
    over the channels, ones over leading (class) tokens."""
    h, w = layout.grid
    kernel = "gaussian" if layout.kind == "tokens" else "point"
    masks = location_masks(layout.grid, kernel)  # (hw, h, w)
    if layout.kind == "CHW":
        m = masks[:, None]  # (hw, 1, h, w)
    elif layout.kind == "HWC":
        m = masks[..., None]  # (hw, h, w, 1)
    else:
        m = np.concatenate([np.ones((h * w, layout.prefix), np.float32), masks.reshape(h * w, h * w)], axis=1)[..., None]
    return ctx.const(np.ascontiguousarray(m[None]).astype(dtype), "recipro_masks")


def _per_image_shape(layout) -> list[int]:
    h, w = layout.grid
    if layout.kind == "CHW":
        return [layout.channels, h, w]
    if layout.kind == "HWC":
        return [h, w, layout.channels]
    return [layout.prefix + h * w, layout.channels]


def _tiled(ctx: ExportContext, tensor: str, masks: str, per_image: list[int]) -> str:
    """(N, ...) → (N*h*w, ...): each image's tensor times each location's mask."""
    copies = ctx.node("Mul", [ctx.unsqueeze(tensor, [1]), masks])  # (N, hw, ...)
    return ctx.reshape(copies, ctx.const(np.asarray([-1, *per_image], np.int64), "tiled_shape"))


def _side_tensors(ctx: ExportContext, head) -> list[str]:
    """The image-dependent tensors ``head`` reads besides the feature layer (none on a CNN layer that
    splits the graph; a ViT's residual stream on its first LayerNorm)."""
    return [t for t in image_reads(ctx.graph, head.inputs) if t != ctx.feature]


def _check_side(ctx: ExportContext, side: list[str]) -> None:
    for t in side:
        shape = ctx.shape(t)
        ours = ctx.shape(ctx.feature)
        if ctx.layout.kind != "tokens" or shape is None or ours is None or tuple(shape[1:]) != tuple(ours[1:]):
            raise UnsupportedModelError(
                f"export: recipro_cam: the head after the feature layer also reads {t!r} (shape {shape}) from "
                "the image, around the layer; only token layers may have such tensors (the residual stream, "
                "masked with them). Pick a feature_layer every path to the scores passes through (on a CNN "
                "the output of a block, not a layer inside it).")


def _free_batch_reshapes(ctx: ExportContext, nodes, mapping: dict, allow_zero: set) -> None:
    """Reshape targets held as constants whose first entry is the measured batch (a graph exported for
    batch 1) get -1 there in the copy (or 0, the input's first axis, with allowzero=0 where -1 is taken),
    so that the h*w copies pass."""
    values = {t.name: t for t in ctx.graph.initializer}
    constants = {n.output[0]: n for n in ctx.graph.node if n.op_type == "Constant" and n.output}
    batch = ctx.measured_batch
    for node in nodes:
        if node.op_type not in ("Reshape", "Expand") or len(node.input) < 2:
            continue
        target = node.input[1]
        if target in values:
            array = numpy_helper.to_array(values[target])
        elif target in constants and constants[target].attribute and constants[target].attribute[0].name == "value":
            array = numpy_helper.to_array(constants[target].attribute[0].t)
        else:
            continue  # computed from shapes in the graph: follows the batch
        if array.ndim != 1 or len(array) == 0 or int(array[0]) != batch or batch != 1:
            continue
        if node.op_type == "Expand":  # 1 broadcasts already
            continue
        fixed = array.astype(np.int64).copy()
        if -1 not in fixed[1:]:
            fixed[0] = -1  # the rest of the elements
        elif 0 not in fixed[1:]:
            fixed[0] = 0  # the input's first axis (allowzero=0, set on the copy)
            allow_zero.add(id(node))
        else:
            raise UnsupportedModelError(
                f"export: recipro_cam: the head's Reshape {node.name or node.output[0]!r} holds the batch size 1 in "
                f"its target {array.tolist()}, which cannot be freed for the masked copies. Export the model with "
                "a dynamic batch axis (torch.onnx.export(..., dynamic_axes={'input': {0: 'batch'}})) and load that.")
        mapping[target] = ctx.const(fixed, "reshape_target")


def _free_flat_gathers(ctx: ExportContext, nodes) -> dict:
    """Flat gathers of a graph exported for batch 1 (the dynamo exporter's ``as_strided``: Reshape(x, [-1])
    then Gather(axis=0) with constant indices (1, ...) into the one image's elements) pick the first
    image's elements only, whatever the batch: in the copy they gather each copy's own elements,
    Reshape(x, [0, -1]) then Gather(axis=1) with the indices' image axis dropped. Returns {id of node:
    (new input 1, attributes to set)} for the copy."""
    if ctx.measured_batch != 1:
        return {}
    producer = {o: n for n in nodes for o in n.output}
    readers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    changes = {}
    for gather in nodes:
        if gather.op_type != "Gather" or next((a.i for a in gather.attribute if a.name == "axis"), 0) != 0:
            continue
        flat = producer.get(gather.input[0])
        if flat is None or flat.op_type != "Reshape" or len(readers.get(flat.output[0], [])) != 1:
            continue
        target, indices = constant_value(ctx.graph, flat.input[1]), constant_value(ctx.graph, gather.input[1])
        shape = ctx.shape(flat.input[0])
        if target is None or indices is None or shape is None or None in shape or target.tolist() != [-1] \
                or indices.ndim < 1 or indices.shape[0] != 1 or shape[0] != 1:
            continue
        per_image = int(np.prod(shape[1:], dtype=np.int64))
        if indices.size and not (0 <= int(indices.min()) and int(indices.max()) < per_image):
            continue
        changes[id(flat)] = (ctx.const(np.asarray([0, -1], np.int64), "per_copy"), {"allowzero": 0})
        changes[id(gather)] = (ctx.const(indices[0].astype(indices.dtype), "per_copy_indices"), {"axis": 1})
    return changes


def _copy_head(ctx: ExportContext, head, inputs: dict) -> str:
    """A renamed copy of ``head``'s nodes reading ``inputs`` ({original tensor: new tensor}); returns the
    copy's scores tensor."""
    mapping, allow_zero = dict(inputs), set()
    _free_batch_reshapes(ctx, head.nodes, mapping, allow_zero)
    flat_gathers = _free_flat_gathers(ctx, head.nodes)
    for t in sorted(head.tensors):
        if t not in inputs:  # a tensor of the head given by the branch (the pooled vectors) is not computed
            mapping[t] = ctx.name(f"recipro/{t.split('/')[-1] or 't'}")
    for n in head.nodes:
        if all(o in inputs for o in n.output if o):
            continue
        copied = onnx.NodeProto()
        copied.CopyFrom(n)
        copied.name = ctx.name("recipro/node")
        del copied.input[:]
        copied.input.extend(mapping.get(i, i) if i else "" for i in n.input)
        del copied.output[:]
        copied.output.extend(mapping[o] if o else "" for o in n.output)
        if id(n) in allow_zero:
            kept = [a for a in copied.attribute if a.name != "allowzero"]
            del copied.attribute[:]
            copied.attribute.extend(kept)
        if id(n) in flat_gathers:
            second, attributes = flat_gathers[id(n)]
            copied.input[1] = second
            kept = [a for a in copied.attribute if a.name not in attributes]
            del copied.attribute[:]
            copied.attribute.extend(kept + [onnx.helper.make_attribute(k, v) for k, v in attributes.items()])
        ctx.graph.node.append(copied)
    return mapping[head.scores]


def _global_pool(ctx: ExportContext) -> str | None:
    """The output of the head's GlobalAveragePool where that is the feature map's only reader in the head
    (ResNets, EfficientNets, MobileNets): a copy keeping location k alone (point masks) pools to location
    k's vector / (h*w), so the branch gives the head after the pool those h*w vectors instead of h*w
    masked maps (the library's two-stage path does the same: ``pooled_head``)."""
    readers = [n for n in ctx.head.nodes if ctx.feature in n.input]
    if len(readers) != 1 or readers[0].op_type != "GlobalAveragePool" or len(readers[0].output) != 1:
        return None
    return readers[0].output[0]


def _scaled(ctx: ExportContext, cams: str) -> str:
    """(N, K, hw) maps, each min-max scaled to [0, 1] over its hw locations (0 where constant)."""
    low = ctx.reduce("ReduceMin", cams, [2], keepdims=1)
    span = ctx.node("Sub", [ctx.reduce("ReduceMax", cams, [2], keepdims=1), low])
    varies = ctx.node("Greater", [span, ctx.scalar(0.0)])
    safe = ctx.node("Where", [varies, span, ctx.scalar(1.0)])
    return ctx.node("Where", [varies, ctx.node("Div", [ctx.node("Sub", [cams, low]), safe]), ctx.scalar(0.0)])


@exporter("recipro_cam")
def recipro_cam(ctx: ExportContext) -> str:
    layout = ctx.layout
    h, w = layout.grid
    hw = h * w
    # on tokens, the copies run the head that reads the class token early where it applies (a ViT's
    # last block then runs its MLP and attention queries on one token per copy)
    head = (ctx.early_head() if layout.kind == "tokens" else None) or ctx.head
    side = _side_tensors(ctx, head)
    _check_side(ctx, side)
    dtype = np.dtype(ctx.np_dtype(ctx.feature))
    # the feature as the branch reads it (kept apart from the source's tensor, or computed again: the
    # source's fusions stay, its outputs bit-identical); the residual stream read apart likewise
    def apart(t: str) -> str:
        return ctx.node("Where", [ctx.const(np.asarray([True]), "true"), t, t])

    read = {ctx.feature: ctx.feature_branch or apart(ctx.feature)}
    read.update({t: apart(t) for t in side})
    pool = _global_pool(ctx) if layout.kind == "CHW" and not side else None
    if pool is not None:  # copy k pools to location k's vector / (h*w): the head after the pool reads those
        flat = ctx.reshape(read[ctx.feature], ctx.const(np.asarray([-1, layout.channels, hw], np.int64), "flat"))
        by_location = ctx.node("Transpose", [flat], perm=[0, 2, 1])  # (N, hw, C)
        vectors = ctx.node("Div", [by_location, ctx.const(np.asarray(hw, dtype), "hw")])
        inputs = {pool: ctx.reshape(vectors, ctx.const(np.asarray([-1, layout.channels, 1, 1], np.int64), "pooled"))}
    else:
        masks, per_image = _mask_constant(ctx, layout, dtype), _per_image_shape(layout)
        inputs = {t: _tiled(ctx, r, masks, per_image) for t, r in read.items()}
    scores = ctx.float32(ctx.node("Flatten", [_copy_head(ctx, head, inputs)], axis=1), ctx.scores)  # (N*hw, classes)
    if ctx.diagnostics is not None:  # the library's in-graph path: the copies' scores, image by image
        ctx.diagnostics["copy_scores"] = scores
    probabilities = ctx.node("Softmax", [scores], axis=1)
    per_image_scores = ctx.reshape(probabilities, ctx.const(np.asarray([-1, hw, ctx.num_classes], np.int64), "grid"))
    by_class = ctx.node("Transpose", [per_image_scores], perm=[0, 2, 1])  # (N, classes, hw)
    if ctx.diagnostics is not None:  # the library's in-graph path: every class's map, scaled, image by image
        ctx.diagnostics["every_map"] = _scaled(ctx, by_class)  # (N, classes, hw)
    index_shape = ctx.node("Concat", [ctx.shape_of(ctx.classes), ctx.const(np.asarray([hw], np.int64), "hw")], axis=0)
    index = ctx.node("Expand", [ctx.unsqueeze(ctx.classes, [2]), index_shape])  # (N, K, hw)
    scaled = _scaled(ctx, ctx.node("GatherElements", [by_class, index], axis=1))  # (N, K, hw)
    shape = ctx.node("Concat", [ctx.shape_of(ctx.classes), ctx.const(np.asarray([h, w], np.int64), "hw_grid")], axis=0)
    return ctx.reshape(scaled, shape)
