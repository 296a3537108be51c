"""A seeded fuzz campaign against the public API (issue #29): mutants of four small classifiers, each
loaded, classified, Grad-CAM'd and occluded in a forked process under an address-space cap and a time
limit, its outcome counted by class.

Outcome classes: ``result`` (every call returned), ``typed`` (an ``ExplainerError`` left a public
function), ``raw`` (any other exception), ``crash`` (the process died: a signal or an exit without a
report), ``hang`` (over the time limit), ``memory`` (stopped by the address-space cap: a MemoryError,
an allocation failure in onnxruntime or torch, typed or not, or a resident peak over
``MEMORY_FLAG_BYTES`` while the run budget is ``RUN_BUDGET``). Only the first two are acceptable.

    python -m tests.fuzz --count 200 --seed 0          # the quick campaign, counts by class
    python -m tests.fuzz --count 600 --seed 0 --keep DIR   # writes every failing mutant to DIR

Mutants are bytes built in memory and written only to temporary folders; nothing is unpickled. The
generator is deterministic: mutant ``i`` of seed ``s`` is the same bytes on every run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OUTCOMES = ("result", "typed", "raw", "crash", "hang", "memory")
OK = ("result", "typed")
#: the address-space cap of each mutant's process, above what the parent already maps (torch maps a few
#: GiB of address space at import)
CAP_ABOVE_PARENT = 2_500 << 20
#: the run budget (EXPLAINER_MAX_RUN_BYTES) each mutant runs under
RUN_BUDGET = 256 << 20
#: resident growth over the parent beyond which a mutant counts as 'memory' even if it ended well
MEMORY_FLAG_BYTES = 1_500 << 20
TIME_LIMIT = 60.0
#: words of the allocation failures of onnxruntime, torch and the C++ runtime (typed or not, such an
#: error means the run was stopped by the address-space cap, not refused by a check)
ALLOCATION_MARKERS = ("failed to allocate", "bad_alloc", "bfcarena", "can't allocate memory", "out of memory",
                      "cannot allocate memory", "could not allocate memory")
OPSET = 17


# --- the four base classifiers -----------------------------------------------------------------------

def _w(rng, *shape, scale=0.1):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def _model(nodes, image, out, inits, name):
    graph = helper.make_graph(nodes, name, [image], [out], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fuzz")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def squeeze() -> onnx.ModelProto:
    """SqueezeNet in miniature, batch fixed to 1 as the Caffe2 exports are: conv/2, pool/2, a fire
    module, pool/2, a 1x1 classifier conv, global average pool, softmax. 16 channels at the pools, so
    that onnxruntime runs them in its blocked (NCHWc) layout, where a zero extent crashed it."""
    rng = np.random.default_rng(1)
    k = 5
    inits = [numpy_helper.from_array(_w(rng, 16, 3, 3, 3, scale=0.01), "c1_w"),
             numpy_helper.from_array(_w(rng, 16), "c1_b"),
             numpy_helper.from_array(_w(rng, 8, 16, 1, 1), "sq_w"),
             numpy_helper.from_array(_w(rng, 8, 8, 1, 1), "e1_w"),
             numpy_helper.from_array(_w(rng, 8, 8, 3, 3), "e3_w"),
             numpy_helper.from_array(_w(rng, k, 16, 1, 1), "cls_w"),
             numpy_helper.from_array(_w(rng, k), "cls_b")]
    nodes = [helper.make_node("Conv", ["data", "c1_w", "c1_b"], ["c1"], name="conv1", strides=[2, 2]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[3, 3], strides=[2, 2]),
             helper.make_node("Conv", ["p1", "sq_w"], ["sq"], name="fire_squeeze"),
             helper.make_node("Relu", ["sq"], ["sqr"], name="fire_relu"),
             helper.make_node("Conv", ["sqr", "e1_w"], ["e1"], name="fire_expand1"),
             helper.make_node("Conv", ["sqr", "e3_w"], ["e3"], name="fire_expand3", pads=[1, 1, 1, 1]),
             helper.make_node("Concat", ["e1", "e3"], ["cat"], name="fire_concat", axis=1),
             helper.make_node("MaxPool", ["cat"], ["p2"], name="pool2", kernel_shape=[3, 3], strides=[2, 2]),
             helper.make_node("Dropout", ["p2"], ["d"], name="drop"),
             helper.make_node("Conv", ["d", "cls_w", "cls_b"], ["cls"], name="conv_cls"),
             helper.make_node("Relu", ["cls"], ["clsr"], name="relu_cls"),
             helper.make_node("GlobalAveragePool", ["clsr"], ["gap"], name="gap"),
             helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
             helper.make_node("Softmax", ["flat"], ["prob"], name="softmax", axis=1)]
    return _model(nodes, helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 32, 32]),
                  helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, k]), inits, "squeeze")


def resnet() -> onnx.ModelProto:
    """A residual block with batch norms, an average pool, a Reshape and a Gemm; free batch."""
    rng = np.random.default_rng(2)
    k = 6
    bn = lambda p: [numpy_helper.from_array(np.ones(8, np.float32), f"{p}_s"),
                    numpy_helper.from_array(_w(rng, 8), f"{p}_b"),
                    numpy_helper.from_array(_w(rng, 8), f"{p}_m"),
                    numpy_helper.from_array(np.ones(8, np.float32), f"{p}_v")]
    inits = [numpy_helper.from_array(_w(rng, 8, 3, 3, 3, scale=0.01), "a_w"), *bn("bn1"),
             numpy_helper.from_array(_w(rng, 8, 8, 3, 3), "b_w"), *bn("bn2"),
             numpy_helper.from_array(np.array([-1, 8], np.int64), "flat_shape"),
             numpy_helper.from_array(_w(rng, k, 8), "fc_w"), numpy_helper.from_array(_w(rng, k), "fc_b")]
    nodes = [helper.make_node("Conv", ["x", "a_w"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["a", "bn1_s", "bn1_b", "bn1_m", "bn1_v"], ["an"], name="bn1"),
             helper.make_node("Relu", ["an"], ["ar"], name="relu_a"),
             helper.make_node("Conv", ["ar", "b_w"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["b", "bn2_s", "bn2_b", "bn2_m", "bn2_v"], ["bnb"], name="bn2"),
             helper.make_node("Add", ["bnb", "ar"], ["res"], name="residual"),
             helper.make_node("Relu", ["res"], ["rr"], name="relu_res"),
             helper.make_node("AveragePool", ["rr"], ["ap"], name="avgpool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("GlobalAveragePool", ["ap"], ["gap"], name="gap"),
             helper.make_node("Reshape", ["gap", "flat_shape"], ["flat"], name="reshape"),
             helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1)]
    return _model(nodes, helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 24, 24]),
                  helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", k]), inits, "resnet")


def dynamic() -> onnx.ModelProto:
    """The ops whose output size is a run-time value: Resize, Pad, Expand, Tile, ConstantOfShape,
    Range, all at harmless sizes."""
    rng = np.random.default_rng(3)
    k = 4
    inits = [numpy_helper.from_array(np.array([1, 1, 0.5, 0.5], np.float32), "rs_scales"),
             numpy_helper.from_array(_w(rng, 8, 3, 3, 3, scale=0.01), "c_w"),
             numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
             numpy_helper.from_array(np.array([1, 8], np.int64), "ex_shape"),
             numpy_helper.from_array(np.array([1, 1], np.int64), "tile_reps"),
             numpy_helper.from_array(_w(rng, 8, k), "mm_w"),
             numpy_helper.from_array(np.array([1, k], np.int64), "cos_shape"),
             numpy_helper.from_array(np.array(0.0, np.float32), "r_start"),
             numpy_helper.from_array(np.array(float(k), np.float32), "r_limit"),
             numpy_helper.from_array(np.array(1.0, np.float32), "r_delta"),
             numpy_helper.from_array(np.array(0.01, np.float32), "r_scale")]
    nodes = [helper.make_node("Resize", ["x", "", "rs_scales"], ["rs"], name="resize", mode="linear"),
             helper.make_node("Conv", ["rs", "c_w"], ["c"], name="conv"),
             helper.make_node("Pad", ["c", "pads"], ["pad"], name="pad"),
             helper.make_node("Relu", ["pad"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["gap"], name="gap"),
             helper.make_node("ReduceMean", ["gap"], ["red"], name="reduce", axes=[2, 3], keepdims=0),
             helper.make_node("Expand", ["red", "ex_shape"], ["ex"], name="expand"),
             helper.make_node("Tile", ["ex", "tile_reps"], ["tile"], name="tile"),
             helper.make_node("MatMul", ["tile", "mm_w"], ["mm"], name="matmul"),
             helper.make_node("ConstantOfShape", ["cos_shape"], ["cos"], name="bias",
                              value=numpy_helper.from_array(np.array([0.1], np.float32))),
             helper.make_node("Add", ["mm", "cos"], ["biased"], name="add_bias"),
             helper.make_node("Range", ["r_start", "r_limit", "r_delta"], ["rng"], name="range"),
             helper.make_node("Mul", ["rng", "r_scale"], ["ramp"], name="ramp"),
             helper.make_node("Add", ["biased", "ramp"], ["logits"], name="add_ramp")]
    return _model(nodes, helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32]),
                  helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", k]), inits, "dynamic")


def uint8_nhwc() -> onnx.ModelProto:
    """An NHWC uint8 input normalised in the graph, a grouped (depthwise) conv, a Gemm and a Softmax."""
    rng = np.random.default_rng(4)
    k = 4
    inits = [numpy_helper.from_array(np.array(127.0, np.float32), "mean"),
             numpy_helper.from_array(np.array(128.0, np.float32), "std"),
             numpy_helper.from_array(_w(rng, 6, 3, 3, 3), "c_w"),
             numpy_helper.from_array(_w(rng, 6, 1, 3, 3), "dw_w"),
             numpy_helper.from_array(_w(rng, k, 6), "fc_w"), numpy_helper.from_array(_w(rng, k), "fc_b")]
    nodes = [helper.make_node("Cast", ["img"], ["f"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Transpose", ["f"], ["t"], name="transpose", perm=[0, 3, 1, 2]),
             helper.make_node("Sub", ["t", "mean"], ["s"], name="sub"),
             helper.make_node("Div", ["s", "std"], ["n"], name="div"),
             helper.make_node("Conv", ["n", "c_w"], ["c"], name="conv", strides=[2, 2]),
             helper.make_node("Conv", ["c", "dw_w"], ["dw"], name="depthwise", group=6, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["dw"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("GlobalAveragePool", ["p"], ["gap"], name="gap"),
             helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
             helper.make_node("Softmax", ["logits"], ["prob"], name="softmax", axis=1)]
    return _model(nodes, helper.make_tensor_value_info("img", TensorProto.UINT8, ["N", 32, 32, 3]),
                  helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", k]), inits, "uint8_nhwc")


BASES = {"squeeze": squeeze, "resnet": resnet, "dynamic": dynamic, "uint8_nhwc": uint8_nhwc}
_BASE_CACHE: dict[str, onnx.ModelProto] = {}


def base(name: str) -> onnx.ModelProto:
    if name not in _BASE_CACHE:
        _BASE_CACHE[name] = BASES[name]()
    m = onnx.ModelProto()
    m.CopyFrom(_BASE_CACHE[name])
    return m


# --- mutations: (model, rng) -> bytes, or a model (serialised by the caller) --------------------------

def _image_input(m):
    inits = {t.name for t in m.graph.initializer}
    return next(i for i in m.graph.input if i.name not in inits)


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


DIM_VALUES = [0, 1, 2, 3, 5, 7, 9, 224, 4096, 1 << 20, -1, -7]


def m_input_dims(m, rng):
    vi = _image_input(m)
    shape = vi.type.tensor_type.shape
    for _ in range(int(rng.integers(1, 3))):
        d = shape.dim[int(rng.integers(len(shape.dim)))]
        choice = int(rng.integers(3))
        if choice == 0:
            d.Clear()
            d.dim_param = "sym"
        else:
            d.Clear()
            d.dim_value = int(_pick(rng, DIM_VALUES))
    return m


def m_input_rank(m, rng):
    shape = _image_input(m).type.tensor_type.shape
    if rng.random() < 0.5 and len(shape.dim) > 1:
        del shape.dim[int(rng.integers(len(shape.dim)))]
    else:
        shape.dim.add().dim_value = int(_pick(rng, [1, 3, 8]))
    return m


def m_output_dims(m, rng):
    shape = m.graph.output[0].type.tensor_type.shape
    if len(shape.dim) == 0:
        return m
    d = shape.dim[int(rng.integers(len(shape.dim)))]
    d.Clear()
    d.dim_value = int(_pick(rng, [0, 1, 2, 3, 1000, -2]))
    return m


ELEM_TYPES = [0, 2, 3, 5, 6, 7, 8, 9, 10, 11, 16, 17, 23, 40, 99, 1000]


def m_input_dtype(m, rng):
    _image_input(m).type.tensor_type.elem_type = int(_pick(rng, ELEM_TYPES))
    return m


def m_output_dtype(m, rng):
    m.graph.output[0].type.tensor_type.elem_type = int(_pick(rng, ELEM_TYPES))
    return m


def m_init_dtype(m, rng):
    t = _pick(rng, list(m.graph.initializer))
    t.data_type = int(_pick(rng, [2, 6, 7, 8, 9, 10, 11, 99]))
    return m


def m_init_dims(m, rng):
    t = _pick(rng, list(m.graph.initializer))
    if len(t.dims) and rng.random() < 0.7:
        t.dims[int(rng.integers(len(t.dims)))] = int(_pick(rng, [0, 1, 2, 64, 1 << 20, -3]))
    else:
        t.dims.append(int(_pick(rng, [1, 2, 3])))
    return m


def m_delete_init(m, rng):
    del m.graph.initializer[int(rng.integers(len(m.graph.initializer)))]
    return m


def _nodes_with_attrs(m, types):
    return [(n, a) for n in m.graph.node for a in n.attribute if a.type in types]


ATTR_INTS = [0, -1, -3, 1, 2, 3, 7, 100, 1 << 20, 1 << 40]


def m_attr_value(m, rng):
    """An int or ints attribute set out of range, to a wrong length, or removed."""
    found = _nodes_with_attrs(m, (onnx.AttributeProto.INT, onnx.AttributeProto.INTS,
                                  onnx.AttributeProto.FLOAT, onnx.AttributeProto.STRING))
    if not found:
        return m
    node, attr = _pick(rng, found)
    how = int(rng.integers(4))
    if how == 0:
        node.attribute.remove(attr)
    elif attr.type == onnx.AttributeProto.INT:
        attr.i = int(_pick(rng, ATTR_INTS))
    elif attr.type == onnx.AttributeProto.INTS:
        n = len(attr.ints) if how != 3 else int(rng.integers(0, 6))
        values = [int(_pick(rng, ATTR_INTS)) for _ in range(n)]
        del attr.ints[:]
        attr.ints.extend(values)
    elif attr.type == onnx.AttributeProto.FLOAT:
        attr.f = float(_pick(rng, [0.0, -1.0, 1e30, float("nan"), float("inf")]))
    else:
        attr.s = _pick(rng, [b"", b"nonsense", b"cubic", b"SAME_UPPER", b"\xff\xfe"])
    return m


def m_add_attr(m, rng):
    """Attributes a node may carry, at values that break it: strides, pads, dilations, kernel_shape,
    auto_pad, ceil_mode."""
    node = _pick(rng, [n for n in m.graph.node if n.op_type in ("Conv", "MaxPool", "AveragePool")] or list(m.graph.node))
    name = _pick(rng, ["strides", "pads", "dilations", "kernel_shape", "auto_pad", "ceil_mode"])
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    if name == "auto_pad":
        node.attribute.append(helper.make_attribute(name, _pick(rng, ["SAME_UPPER", "VALID", "SAME_LOWER", "BAD"])))
    elif name == "ceil_mode":
        node.attribute.append(helper.make_attribute(name, int(_pick(rng, [0, 1, 5]))))
    else:
        n = 4 if name == "pads" else 2
        if rng.random() < 0.2:
            n = int(rng.integers(0, 5))
        node.attribute.append(helper.make_attribute(name, [int(_pick(rng, [0, 1, 2, 5, 16, 33, -1, 1 << 20])) for _ in range(n)]))
    return m


def m_group(m, rng):
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    if not convs:
        return m
    node = _pick(rng, convs)
    for a in list(node.attribute):
        if a.name == "group":
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute("group", int(_pick(rng, [0, -1, 2, 3, 5, 7, 16, 1 << 31]))))
    return m


def m_axis(m, rng):
    nodes = [n for n in m.graph.node if n.op_type in ("Concat", "Softmax", "Flatten", "ReduceMean", "Transpose")]
    if not nodes:
        return m
    node = _pick(rng, nodes)
    for a in list(node.attribute):
        if a.name in ("axis", "axes", "perm"):
            node.attribute.remove(a)
    if node.op_type == "ReduceMean":
        node.attribute.append(helper.make_attribute("axes", [int(_pick(rng, [5, -9, 100, 2])), 3]))
    elif node.op_type == "Transpose":
        node.attribute.append(helper.make_attribute("perm", [int(v) for v in rng.permutation(int(_pick(rng, [3, 4, 5])))][:4] + ([4] if rng.random() < 0.3 else [])))
    else:
        node.attribute.append(helper.make_attribute("axis", int(_pick(rng, [4, 5, -5, -9, 100, 1 << 40]))))
    return m


OP_TYPES = ["Relu", "Sigmoid", "Conv", "MaxPool", "AveragePool", "GlobalMaxPool", "Softmax", "Resize", "Gemm",
            "MatMul", "Unique", "NonZero", "TopK", "Flatten", "Concat", "Transpose", "Identity", "Foo",
            "Loop", "Upsample", "LpPool", "ConvTranspose", "Pad", "Tile", "Expand", "Einsum"]


def m_op_type(m, rng):
    node = _pick(rng, list(m.graph.node))
    node.op_type = _pick(rng, OP_TYPES)
    return m


def m_domain(m, rng):
    node = _pick(rng, list(m.graph.node))
    node.domain = _pick(rng, ["com.evil", "ai.onnx.ml", "com.microsoft", "ai.onnx.preview.training", "x"])
    if rng.random() < 0.5:
        m.opset_import.append(helper.make_opsetid(node.domain, int(_pick(rng, [1, 99]))))
    return m


def m_opset(m, rng):
    how = int(rng.integers(3))
    if how == 0:
        m.opset_import[0].version = int(_pick(rng, [0, 1, 6, 9, 99, 1 << 40]))
    elif how == 1:
        m.opset_import.append(helper.make_opsetid(_pick(rng, ["com.unknown", "", "ai.onnx"]), int(_pick(rng, [1, 99]))))
    else:
        m.ir_version = int(_pick(rng, [0, 1, 3, 99, -1]))
    return m


def m_cycle(m, rng):
    nodes = list(m.graph.node)
    i = int(rng.integers(len(nodes)))
    j = int(rng.integers(i, len(nodes)))
    node = nodes[i]
    if node.input:
        node.input[int(rng.integers(len(node.input)))] = nodes[j].output[0]
    if rng.random() < 0.3:  # and out of topological order
        del m.graph.node[:]
        m.graph.node.extend(reversed(nodes))
    return m


def m_duplicate_output(m, rng):
    nodes = list(m.graph.node)
    how = int(rng.integers(3))
    if how == 0 and len(nodes) > 2:
        a, b = rng.choice(len(nodes), 2, replace=False)
        nodes[int(a)].output[0] = nodes[int(b)].output[0]
    elif how == 1:
        m.graph.output.append(m.graph.output[0])
    else:
        m.graph.output[0].name = _pick(rng, ["nowhere", nodes[0].output[0], _image_input(m).name])
    return m


def m_drop_input(m, rng):
    node = _pick(rng, [n for n in m.graph.node if n.input] or list(m.graph.node))
    if node.input:
        k = int(rng.integers(len(node.input)))
        if rng.random() < 0.5:
            node.input[k] = ""
        else:
            del node.input[k]
    return m


def m_extra_input(m, rng):
    """A second graph input, or the image declared twice."""
    if rng.random() < 0.5:
        m.graph.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1, 3, 8, 8]))
        m.graph.node[0].input.append("extra")
    else:
        m.graph.input.append(_image_input(m))
    return m


PREPROCESSING_VALUES = ["[1, 2]", "null", "42", '"imagenet"', '{"mean": "a"}', '{"mean": [1, 2]}', "{", "",
                        '{"std": [0, 0, 0]}', '{"scale": 1e400}', '{"channel_order": 5}', '{"unknown": 1}',
                        '{"mean": [1e309, 0, 0]}', '{"mean": {"a": 1}}', "[]", "true"]
LABEL_VALUES = ["", "a", "[1, 2]", "null", "42", '{"x": 1}', "a\nb", "\x00", "[" * 5000, '["a", "b"]']
IMAGE_METADATA = [("Image.NominalPixelRange", "NominalRange_16_235"), ("Image.NominalPixelRange", ""),
                  ("Image.BitmapPixelFormat", "Yuv"), ("Image.BitmapPixelFormat", "Gray8")]


def m_metadata(m, rng):
    how = int(rng.integers(3))
    if how == 0:
        key, value = "onnx_explainer.preprocessing", _pick(rng, PREPROCESSING_VALUES)
    elif how == 1:
        key, value = _pick(rng, ["onnx_explainer.labels", "labels", "class_names", "classes", "names"]), _pick(rng, LABEL_VALUES)
    else:
        key, value = _pick(rng, IMAGE_METADATA)
    m.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    return m


def m_truncate(m, rng):
    data = m.SerializeToString()
    return data[:int(rng.integers(0, len(data)))]


def m_bitflip(m, rng):
    data = bytearray(m.SerializeToString())
    for _ in range(int(rng.integers(1, 9))):
        k = int(rng.integers(len(data)))
        data[k] ^= 1 << int(rng.integers(8))
    return bytes(data)


def m_zero_extent(m, rng):
    """The image's height or width small enough for a pool or strided conv to reach 0 (squeezenet
    with its input declared 3x7x224 crashed onnxruntime with SIGFPE)."""
    vi = _image_input(m)
    dims = vi.type.tensor_type.shape.dim
    nhwc = vi.type.tensor_type.elem_type == TensorProto.UINT8
    axis = _pick(rng, [1, 1, 1, 2] if nhwc else [2, 2, 2, 3])  # mostly the height, as in the issue
    dims[axis].Clear()
    dims[axis].dim_value = int(_pick(rng, [1, 2, 3, 4, 5, 6, 7, 8]))
    return m


# huge tensors asked for at run time: a few bytes of graph, gigabytes when run --------------------------

SIDES = [64, 512, 2048, 8192, 30000, 1 << 17]


def _after_gap(m, rng, make):
    """Insert nodes made by ``make(g, rng) -> (nodes, inits, out)`` after the GlobalAveragePool's
    output ``g`` (N, C, 1, 1); its consumers read ``out`` instead, which must be (N, C, 1, 1)."""
    gap = next(n for n in m.graph.node if n.op_type == "GlobalAveragePool")
    g = gap.output[0]
    consumers = [n for n in m.graph.node if g in n.input]
    nodes, inits, out = make(g, rng)
    for n in consumers:
        for k, name in enumerate(n.input):
            if name == g:
                n.input[k] = out
    at = list(m.graph.node).index(gap) + 1
    for k, n in enumerate(nodes):
        m.graph.node.insert(at + k, n)
    m.graph.initializer.extend(inits)
    return m


def _i64(name, values):
    return numpy_helper.from_array(np.asarray(values, np.int64), name)


def _f32(name, values):
    return numpy_helper.from_array(np.asarray(values, np.float32), name)


def m_huge_expand(m, rng):
    s = int(_pick(rng, SIDES))
    return _after_gap(m, rng, lambda g, r: ([helper.make_node("Expand", [g, "fz_shape"], ["fz_e"], name="fz_expand"),
                                            helper.make_node("GlobalAveragePool", ["fz_e"], ["fz_out"], name="fz_gap")],
                                           [_i64("fz_shape", [1, 1, s, s])], "fz_out"))


def m_huge_tile(m, rng):
    s = int(_pick(rng, SIDES))
    return _after_gap(m, rng, lambda g, r: ([helper.make_node("Tile", [g, "fz_reps"], ["fz_t"], name="fz_tile"),
                                            helper.make_node("GlobalAveragePool", ["fz_t"], ["fz_out"], name="fz_gap")],
                                           [_i64("fz_reps", [1, 1, s, s])], "fz_out"))


def m_huge_resize(m, rng):
    s = float(_pick(rng, SIDES))
    return _after_gap(m, rng, lambda g, r: ([helper.make_node("Resize", [g, "", "fz_scales"], ["fz_r"], name="fz_resize"),
                                            helper.make_node("GlobalAveragePool", ["fz_r"], ["fz_out"], name="fz_gap")],
                                           [_f32("fz_scales", [1, 1, s, s])], "fz_out"))


def m_huge_pad(m, rng):
    p = int(_pick(rng, SIDES)) // 2
    return _after_gap(m, rng, lambda g, r: ([helper.make_node("Pad", [g, "fz_pads"], ["fz_p"], name="fz_pad"),
                                            helper.make_node("GlobalMaxPool", ["fz_p"], ["fz_out"], name="fz_gap")],
                                           [_i64("fz_pads", [0, 0, p, p, 0, 0, p, p])], "fz_out"))


def m_huge_range(m, rng):
    n = float(_pick(rng, SIDES)) ** 2
    return _after_gap(m, rng, lambda g, r: ([helper.make_node("Range", ["fz_0", "fz_n", "fz_1"], ["fz_r"], name="fz_range"),
                                            helper.make_node("ReduceMin", ["fz_r"], ["fz_min"], name="fz_min", keepdims=0),
                                            helper.make_node("Add", [g, "fz_min"], ["fz_out"], name="fz_add")],
                                           [_f32("fz_0", 0.0), _f32("fz_n", n), _f32("fz_1", 1.0)], "fz_out"))


def m_huge_constant_of_shape(m, rng):
    """ConstantOfShape whose shape is computed at run time (from the input's Shape), out of reach of
    the load-time check of constant shapes."""
    s = int(_pick(rng, SIDES))

    def make(g, r):
        return ([helper.make_node("Shape", [g], ["fz_s"], name="fz_shape", end=2),
                 helper.make_node("Concat", ["fz_s", "fz_hw"], ["fz_full"], name="fz_concat", axis=0),
                 helper.make_node("ConstantOfShape", ["fz_full"], ["fz_c"], name="fz_cos",
                                  value=numpy_helper.from_array(np.array([0.0], np.float32))),
                 helper.make_node("Add", [g, "fz_c"], ["fz_a"], name="fz_add"),
                 helper.make_node("GlobalAveragePool", ["fz_a"], ["fz_out"], name="fz_gap")],
                [_i64("fz_hw", [s, s])], "fz_out")
    return _after_gap(m, rng, make)


def m_negative_cancel(m, rng):
    """Two constant ConstantOfShape shapes: one with a negative dim whose (negative) size cancels the
    other's huge one in the load-time sum."""
    s = int(_pick(rng, [1 << 15, 1 << 16, 1 << 17]))

    def make(g, r):
        return ([helper.make_node("ConstantOfShape", ["fz_big"], ["fz_c"], name="fz_cos_big",
                                  value=numpy_helper.from_array(np.array([0.0], np.float32))),
                 helper.make_node("ConstantOfShape", ["fz_neg"], ["fz_n"], name="fz_cos_neg",
                                  value=numpy_helper.from_array(np.array([0.0], np.float32))),
                 helper.make_node("ReduceMin", ["fz_c"], ["fz_m"], name="fz_min", keepdims=0),
                 helper.make_node("Add", [g, "fz_m"], ["fz_out"], name="fz_add")],
                [_i64("fz_big", [s, s]), _i64("fz_neg", [-1, s, s])], "fz_out")
    return _after_gap(m, rng, make)


MUTATORS = {
    "input_dims": m_input_dims, "input_rank": m_input_rank, "output_dims": m_output_dims,
    "input_dtype": m_input_dtype, "output_dtype": m_output_dtype, "init_dtype": m_init_dtype,
    "init_dims": m_init_dims, "delete_init": m_delete_init, "attr_value": m_attr_value,
    "add_attr": m_add_attr, "group": m_group, "axis": m_axis, "op_type": m_op_type, "domain": m_domain,
    "opset": m_opset, "cycle": m_cycle, "duplicate_output": m_duplicate_output, "drop_input": m_drop_input,
    "extra_input": m_extra_input, "metadata": m_metadata, "truncate": m_truncate, "bitflip": m_bitflip,
    "zero_extent": m_zero_extent, "huge_expand": m_huge_expand, "huge_tile": m_huge_tile,
    "huge_resize": m_huge_resize, "huge_pad": m_huge_pad, "huge_range": m_huge_range,
    "huge_constant_of_shape": m_huge_constant_of_shape, "negative_cancel": m_negative_cancel,
}


@dataclass
class Mutant:
    seed: int
    index: int
    base: str
    kinds: tuple
    data: bytes

    @property
    def name(self) -> str:
        return f"s{self.seed}-{self.index:04d}-{self.base}-{'+'.join(self.kinds)}"


def mutant(seed: int, index: int) -> Mutant:
    """Mutant ``index`` of campaign ``seed``: a base (round robin) and one mutation (two in one case of
    five), chosen by a generator seeded with (seed, index)."""
    rng = np.random.default_rng([seed, index])
    names = list(BASES)
    base_name = names[index % len(names)]
    m = base(base_name)
    kinds = list(MUTATORS)
    chosen = [_pick(rng, kinds)]
    if rng.random() < 0.2:
        chosen.append(_pick(rng, kinds))
    data = None
    for kind in chosen:
        if data is not None:  # bytes already: a second mutation of the bytes
            if kind in ("truncate", "bitflip"):
                data = MUTATORS[kind](_BytesModel(data), rng)
            continue
        try:
            out = MUTATORS[kind](m, rng)
        except (IndexError, StopIteration, ValueError):  # this base has nothing to mutate so
            out = m
        if isinstance(out, bytes):
            data = out
        else:
            m = out
    if data is None:
        data = m.SerializeToString()
    return Mutant(seed, index, base_name, tuple(chosen), data)


class _BytesModel:
    def __init__(self, data):
        self.data = data

    def SerializeToString(self):
        return self.data


# --- running one mutant -----------------------------------------------------------------------------

def _image():
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, (24, 28, 3), dtype=np.uint8)


def walk(data: bytes, full: bool = False) -> None:
    """What a new user does with a model file: load it, classify, Grad-CAM, occlusion; ``full`` also
    walks the rest of the public API's model-facing calls."""
    import explainer

    image = _image()
    auto = full or (len(data) % 5 == 0)  # a fifth of the mutants measure the batch size
    if not full:
        return _walk(explainer, image, data, auto, full)
    import shutil

    folder = tempfile.mkdtemp(prefix="onnx-explainer-fuzz-")
    try:  # from a file, as most users load: the path's own checks run too
        path = os.path.join(folder, "mutant.onnx")
        with open(path, "wb") as f:
            f.write(data)
        _walk(explainer, image, path, auto, full)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _walk(explainer, image, source, auto: bool, full: bool) -> None:
    net = explainer.load(source, batch_size="auto" if auto else 4)
    repr(net)
    net.top_k(image, 2)
    net.predict(np.stack([image, image]))
    explainer.gradcam(net, image, 0)
    explainer.occlusion_sensitivity(net, image, 0, verbose=False)
    if full:
        net.classify(image)
        net.logits(image)
        layers = net.layers()
        net.activations(image, layers[0].name)
        explainer.gradcam_layers(net)
        explainer.saliency(net, image, 0)
        explainer.occlusion_sensitivity(net, image, 0, verbose=False, incremental=False, batch_size=3)


def _child(fd: int, data: bytes, full: bool, cap: int | None, trace: str | None = None,
           time_limit: float = TIME_LIMIT) -> None:
    """Walks ``data`` and writes its report (JSON) to the pipe ``fd``; runs in the forked process.
    ``trace``: a file the Python stacks of every thread are written to shortly before ``time_limit``
    (what a hang was doing, read by ``run_many``)."""
    if trace is not None:
        import faulthandler

        faulthandler.dump_traceback_later(max(1.0, time_limit - 2.0), file=open(trace, "w"))  # noqa: SIM115
    import explainer
    import torch
    from explainer import limits
    from explainer.errors import ExplainerError

    torch.set_num_threads(1)  # OpenMP's pool of the parent does not survive the fork

    import logging

    logging.getLogger("explainer").setLevel(logging.ERROR)
    import warnings

    warnings.simplefilter("ignore")
    if cap is not None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    limits.MAX_RUN_BYTES = RUN_BUDGET
    report = {}
    try:
        walk(data, full)
        report = {"outcome": "result"}
    except MemoryError as exc:
        report = {"outcome": "memory", "type": "MemoryError", "message": str(exc)[:300]}
    except BaseException as exc:  # noqa: BLE001  (every kind is counted)
        kind = "typed" if isinstance(exc, ExplainerError) else "raw"
        message = str(exc)
        if getattr(exc, "allocation_failed", False) or any(w in message.lower() for w in ALLOCATION_MARKERS):
            kind = "memory"  # a run that nothing refused before it started, stopped by the cap
        report = {"outcome": kind, "type": f"{type(exc).__module__}.{type(exc).__name__}",
                  "message": message[:300]}
        if kind == "raw":
            report["traceback"] = traceback.format_exc()[-1500:]
    report["maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    payload = json.dumps(report).encode()
    while payload:
        payload = payload[os.write(fd, payload):]
    os.close(fd)
    os._exit(0)


def prepare_parent() -> None:
    """Imports everything a mutant uses, so that each forked process starts warm; nothing that starts
    threads (no session, no torch op) runs here, which keeps fork safe."""
    import explainer  # noqa: F401
    import onnxruntime  # noqa: F401
    import onnx2torch  # noqa: F401
    import torch  # noqa: F401
    from explainer.methods import gradcam, occlusion, saliency  # noqa: F401
    from explainer.runtime import classifier, torch_engine  # noqa: F401
    import explainer.runtime.incremental  # noqa: F401
    import explainer.convert.converters  # noqa: F401  (the torch path's registry, built at import)
    import PIL.Image  # noqa: F401
    import gc

    gc.collect()  # the parent's garbage (a test's sessions) is not left for every child to collect

    if "ONNX_EXPLAINER_CACHE" not in os.environ:  # never the user's cache; removed when the run ends
        import atexit
        import shutil

        os.environ["ONNX_EXPLAINER_CACHE"] = tempfile.mkdtemp(prefix="onnx-explainer-fuzz-cache-")
        atexit.register(shutil.rmtree, os.environ["ONNX_EXPLAINER_CACHE"], ignore_errors=True)


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class Outcome:
    name: str
    outcome: str
    detail: str = ""
    seconds: float = 0.0
    data: bytes = field(default=b"", repr=False)



def _drain(read: int, chunks: list) -> None:
    """Whatever the child has written so far (the pipe is non-blocking) appended to ``chunks``."""
    try:
        while True:
            chunk = os.read(read, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    except BlockingIOError:
        pass

def run_many(items, *, jobs: int = 2, time_limit: float = TIME_LIMIT, full: bool = False,
             cap: int | None = -1, progress=None) -> list[Outcome]:
    """Each (name, bytes) in ``items`` walked in its own forked process (``jobs`` at a time) under the
    address-space cap ``cap`` (-1: the parent's mapping plus ``CAP_ABOVE_PARENT``; None: no cap)."""
    import shutil

    prepare_parent()
    if cap == -1:
        cap = _vm_size() + CAP_ABOVE_PARENT
    traces = tempfile.mkdtemp(prefix="onnx-explainer-fuzz-traces-")
    try:
        return _run_many(items, jobs, time_limit, full, cap, progress, traces)
    finally:
        shutil.rmtree(traces, ignore_errors=True)


def _hang_stack(trace: str, frames: int = 8) -> str:
    """The innermost ``frames`` frames of each thread's stack a hung child dumped, or ''."""
    try:
        with open(trace) as f:
            text = f.read()
    except OSError:
        return ""
    kept, depth = [], 0
    for line in text.splitlines():
        if not line.startswith("  "):  # a thread's header ("Thread 0x... (most recent call first):")
            kept.append(line)
            depth = 0
        elif depth < frames:
            kept.append(line)
            depth += 1
    return "\n".join(kept)[:4000]


def _run_many(items, jobs, time_limit, full, cap, progress, traces) -> list[Outcome]:
    base_rss = _rss()
    pending = list(items)
    running = []  # (pid, read end, chunks, name, data, start)
    results: list[Outcome] = []
    while pending or running:
        while pending and len(running) < jobs:
            name, data = pending.pop(0)
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: never returns into the caller's code
                try:
                    os.close(read)
                    _child(write, data, full, cap, os.path.join(traces, f"{os.getpid()}.txt"), time_limit)
                finally:
                    os._exit(3)
            os.close(write)
            os.set_blocking(read, False)
            running.append([pid, read, [], name, data, time.monotonic()])
        time.sleep(0.01)
        still = []
        for entry in running:
            pid, read, chunks, name, data, start = entry
            _drain(read, chunks)
            done, status = os.waitpid(pid, os.WNOHANG)
            elapsed = time.monotonic() - start
            if done == 0 and elapsed < time_limit:
                still.append(entry)
                continue
            if done == 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                stack = _hang_stack(os.path.join(traces, f"{pid}.txt"))
                detail = f"over {time_limit:.0f} s" + (f"; its stacks:\n{stack}" if stack else "")
                out = Outcome(name, "hang", detail, elapsed, data)
            else:
                _drain(read, chunks)
                try:
                    report = json.loads(b"".join(chunks).decode())
                except ValueError:
                    report = None
                if report is None:
                    if os.WIFSIGNALED(status):
                        what = f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
                    else:
                        what = f"exit {os.WEXITSTATUS(status)} without a report"
                    out = Outcome(name, "crash", what, elapsed, data)
                else:
                    kind = report["outcome"]
                    if kind in OK and report.get("maxrss", 0) - base_rss > MEMORY_FLAG_BYTES:
                        kind = "memory"
                        report["message"] = f"resident peak {report['maxrss'] >> 20} MiB; " + report.get("message", "")
                    detail = f"{report.get('type', '')}: {report.get('message', '')}".strip(": ")
                    if kind == "raw":
                        detail += "\n" + report.get("traceback", "")
                    out = Outcome(name, kind, detail, elapsed, data)
            os.close(read)
            results.append(out)
            if progress:
                progress(out)
        running = still
    return results


def campaign(seed: int, count: int, start: int = 0, **kw) -> list[Outcome]:
    items = []
    for i in range(start, start + count):
        m = mutant(seed, i)
        items.append((m.name, m.data))
    return run_many(items, **kw)


def counts(results) -> dict:
    c = Counter(r.outcome for r in results)
    return {k: c.get(k, 0) for k in OUTCOMES}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--keep", help="folder to write failing mutants to")
    parser.add_argument("--json", help="write every outcome to this file")
    parser.add_argument("-v", action="store_true")
    args = parser.parse_args(argv)
    t0 = time.monotonic()

    def show(o):
        if o.outcome not in OK or args.v:
            print(f"{o.outcome:7s} {o.seconds:5.1f}s {o.name}: {o.detail.splitlines()[0][:200] if o.detail else ''}", flush=True)

    results = campaign(args.seed, args.count, args.start, jobs=args.jobs, full=args.full, progress=show)
    print(json.dumps(counts(results)), f"{time.monotonic() - t0:.1f} s", flush=True)
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
        for r in results:
            if r.outcome not in OK:
                with open(os.path.join(args.keep, r.name + ".onnx"), "wb") as f:
                    f.write(r.data)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"name": r.name, "outcome": r.outcome, "detail": r.detail, "seconds": round(r.seconds, 2)}
                       for r in results], f, indent=1)
    return 0 if all(r.outcome in OK for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
