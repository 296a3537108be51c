"""Constant folding: nodes whose inputs are all constants become initializers (weights produced by
ConstantOfShape, shape arithmetic left by exporters)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .. import limits
from ..errors import ResourceLimitError
from ..graph import attribute, reads
from .passes import register

# Ops that are safe and cheap to evaluate with onnx's reference evaluator at conversion time.
FOLDABLE = {"ConstantOfShape", "Shape", "Gather", "Concat", "Slice", "Transpose", "Cast", "Reshape",
            "Unsqueeze", "Squeeze", "Constant", "Identity", "Add", "Sub", "Mul", "Div", "Range",
            "Equal", "Where", "Less", "Greater", "Not", "Neg", "Abs", "Min", "Max", "Mod", "Floor", "Ceil"}


def fold(model: onnx.ModelProto, ops=FOLDABLE) -> int:
    from onnx.reference import ReferenceEvaluator

    g = model.graph
    # weights are read into numpy only when a foldable node uses them (VGG19 holds 575 MB of them)
    tensors = {t.name: t for t in g.initializer}
    known = _LazyValues(tensors)
    keep, folded = [], 0
    for node in g.node:
        inputs = [i for i in node.input if i]
        if node.op_type in ops and all(i in known for i in inputs) and node.domain in ("", "ai.onnx"):
            if node.op_type == "ConstantOfShape":
                _check_size(known[inputs[0]], attribute(node, "value"))
            sub = onnx.helper.make_model(
                onnx.helper.make_graph(
                    [node], "fold",
                    [onnx.helper.make_tensor_value_info(i, onnx.helper.np_dtype_to_tensor_dtype(known[i].dtype), known[i].shape) for i in inputs],
                    [onnx.helper.make_empty_tensor_value_info(o) for o in node.output if o]),
                opset_imports=model.opset_import)
            try:
                values = ReferenceEvaluator(sub).run(None, {i: known[i] for i in inputs})
            except Exception:
                keep.append(node)
                continue
            for name, value in zip([o for o in node.output if o], values):
                value = np.asarray(value)
                g.initializer.append(numpy_helper.from_array(value, name))
                known[name] = value
            folded += 1
        else:
            keep.append(node)
    if folded:
        del g.node[:]
        g.node.extend(keep)
        drop_unused_initializers(g)
    return folded


class _LazyValues(dict):
    """Initializer name → numpy value, converted on first access."""

    def __init__(self, tensors: dict):
        super().__init__()
        self.tensors = tensors

    def __contains__(self, name) -> bool:
        return dict.__contains__(self, name) or name in self.tensors

    def __getitem__(self, name):
        if not dict.__contains__(self, name):
            dict.__setitem__(self, name, numpy_helper.to_array(self.tensors[name]))
        return dict.__getitem__(self, name)


def _check_size(shape, value_tensor) -> None:
    itemsize = 4 if value_tensor is None else np.dtype(
        onnx.helper.tensor_dtype_to_np_dtype(value_tensor.data_type)).itemsize
    count = int(np.prod(np.asarray(shape, dtype=np.float64)))
    if count * itemsize > limits.MAX_TENSOR_BYTES:
        raise ResourceLimitError(
            f"a ConstantOfShape node would allocate {count * itemsize} bytes, over "
            f"limits.MAX_TENSOR_BYTES={limits.MAX_TENSOR_BYTES}; raise it only for a trusted model.")


def drop_unused_initializers(g: onnx.GraphProto) -> None:
    used = {i for n in g.node for i in reads(n)} | {o.name for o in g.output}
    dropped = {t.name for t in g.initializer if t.name not in used}
    for i in reversed([i for i, t in enumerate(g.initializer) if t.name in dropped]):
        del g.initializer[i]  # in place: the kept weights are never copied
    for vi in [i for i in g.input if i.name in dropped]:  # old IR versions list weights as inputs too
        g.input.remove(vi)


#: more ops folded where every input is a constant, for the torch conversion only (onnxruntime folds them
#: itself; the library's own graph keeps them, so its outputs stay the file's bit for bit): the image-
#: independent arithmetic that exporters leave on weights, which onnx2torch could not convert or the
#: conversion refuses -- NF-RegNet's weight standardisation (a BatchNormalization with training_mode=1 on
#: a conv weight, its statistics ReduceMeans of it), SwinV2's logit scale (a Clip of a parameter with a
#: Constant bound, "dynamic" to onnx2torch). No op here makes its output larger than its inputs.
CONSTANT_MATH = FOLDABLE | {"BatchNormalization", "Clip", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin",
                            "Sqrt", "Pow", "Exp", "Log", "Reciprocal", "Sigmoid", "Tanh", "Relu", "Erf", "Sum",
                            "Mean", "Softmax", "LayerNormalization"}


@register("fold-constant-math", targets=("torch",), order=6)
def fold_constant_math(model: onnx.ModelProto, ctx) -> int:
    """Image-independent arithmetic on weights (``CONSTANT_MATH``) folded into initializers."""
    return fold(model, CONSTANT_MATH)


@register("fold-constants", targets=("runtime", "torch"), order=5)
def fold_constants(model: onnx.ModelProto, ctx) -> int:
    """Also for onnxruntime (which folds them anyway): ``free-batch`` reads shapes that exporters
    compute from constants, e.g. ``Where(Equal(shape, -1), 1, shape)`` before a class token's Expand."""
    return fold(model)
