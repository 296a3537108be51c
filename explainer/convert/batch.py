"""Passes that free a graph exported for batch 1 to run on any batch size."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..model.graph import attribute, constant_value, downstream_of
from .passes import register


@register("dynamic-batch", targets=("runtime", "torch"), order=10)
def dynamic_batch(model: onnx.ModelProto, ctx) -> int:
    """Make dim 0 of the image input and of every output symbolic, and drop stale intermediate shapes
    (they were recorded for batch 1 and would contradict larger batches)."""
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
    return changed


@register("drop-unused-inputs", targets=("runtime", "torch"), order=1)
def drop_unused_inputs(model: onnx.ModelProto, ctx) -> int:
    """Graph inputs no node reads (Caffe2's queue inputs) would still be demanded by onnxruntime."""
    g = model.graph
    used = {i for node in g.node for i in node.input} | {o.name for o in g.output}
    inits = {t.name for t in g.initializer}
    unused = [vi for vi in g.input if vi.name not in used and vi.name not in inits]
    for vi in unused:
        g.input.remove(vi)
    return len(unused)


@register("reshape-batch", targets=("runtime", "torch"), order=20)
def reshape_batch(model: onnx.ModelProto, ctx) -> int:
    """A Reshape on the image's data path whose constant target shape starts with 1 (the exported batch)
    gets 0 there instead, which copies the actual batch size (zoo GoogLeNet, AlexNet, ShuffleNet)."""
    g = model.graph
    batch_path = downstream_of(g, ctx.image_input)
    changed = 0
    for node in g.node:
        if node.op_type != "Reshape" or node.input[0] not in batch_path or attribute(node, "allowzero", 0):
            continue
        if len(node.input) < 2 or node.input[1] in batch_path:
            continue
        shape = constant_value(g, node.input[1])
        if shape is None or shape.ndim != 1 or len(shape) == 0 or shape[0] != 1:
            continue
        new_shape = shape.astype(np.int64).copy()
        new_shape[0] = 0
        name = f"{node.input[1]}__any_batch_{changed}"
        while any(t.name == name for t in g.initializer):
            name += "_"
        g.initializer.append(numpy_helper.from_array(new_shape, name))
        node.input[1] = name
        changed += 1
    return changed
