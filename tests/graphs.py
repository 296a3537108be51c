"""Tiny ONNX classifiers built in code, with numpy versions of what they compute (independent truth)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]


def _model(nodes, inputs, outputs, inits, opset=OPSET, **kw):
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=opset, **kw)
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def weights(k=4, c=3, seed=0):
    rng = np.random.default_rng(seed)
    # scaled for 0..255 pixel inputs, so logits stay in a range where softmax is not saturated
    return ((0.01 * rng.standard_normal((k, c))).astype(np.float32), rng.standard_normal(k).astype(np.float32))


def linear_classifier(k=4, c=3, *, size=(8, 8), layout="NCHW", dtype=TensorProto.FLOAT, softmax=False,
                      batch=None, spatial_output=False, seed=0, normalise_div=False):
    """Conv1x1 -> Relu -> GlobalAveragePool -> Flatten (logits) [-> Softmax]; returns (model, numpy fn).

    The numpy function takes (N, C, H, W) float model input and returns the graph's output.
    """
    w, b = weights(k, c, seed)
    h, wd = size
    n = batch if batch is not None else "N"
    shape = [n, c, h, wd] if layout == "NCHW" else [n, h, wd, c]
    nodes, inits = [], [numpy_helper.from_array(w.reshape(k, c, 1, 1), "W"),
                        numpy_helper.from_array(b, "B")]
    x = "image"
    if dtype == TensorProto.UINT8:
        nodes.append(helper.make_node("Cast", ["image"], ["image_f"], to=TensorProto.FLOAT))
        x = "image_f"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", [x], ["nchw"], perm=[0, 3, 1, 2]))
        x = "nchw"
    nodes += [helper.make_node("Conv", [x, "W", "B"], ["conv"], name="conv1"),
              helper.make_node("Relu", ["conv"], ["relu"], name="relu1"),
              helper.make_node("GlobalAveragePool", ["relu"], ["gap"], name="gap")]
    last = "gap"
    if not spatial_output:
        nodes.append(helper.make_node("Flatten", ["gap"], ["logits"], name="flatten"))
        last = "logits"
    out_shape = [n, k, 1, 1] if spatial_output else [n, k]
    if softmax:
        nodes.append(helper.make_node("Softmax", [last], ["prob"], name="softmax", axis=1))
        last = "prob"
    if normalise_div:  # probabilities without a Softmax node: exp(x) / sum(exp(x))
        nodes += [helper.make_node("Exp", [last], ["e"]),
                  helper.make_node("ReduceSum", ["e", "axes"], ["s"], keepdims=1),
                  helper.make_node("Div", ["e", "s"], ["prob"], name="normalise")]
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "axes"))
        last = "prob"
    model = _model(nodes, [helper.make_tensor_value_info("image", dtype, shape)],
                   [helper.make_tensor_value_info(last, TensorProto.FLOAT, out_shape)], inits)

    def reference(x_nchw: np.ndarray) -> np.ndarray:
        conv = np.einsum("kc,nchw->nkhw", w, x_nchw.astype(np.float64)) + b[None, :, None, None]
        logits = np.maximum(conv, 0).mean(axis=(2, 3))
        if softmax or normalise_div:
            e = np.exp(logits - (0 if normalise_div else logits.max(1, keepdims=True)))
            logits = e / e.sum(1, keepdims=True)
        return logits.reshape(len(x_nchw), k, 1, 1) if spatial_output else logits

    return model, reference
