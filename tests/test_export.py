"""``explainer.export_explained``: Grad-CAM (and Grad-CAM++) written into the ONNX graph.

Independent truth: the library's torch Grad-CAM on the converted module (maps), the source model in
onnxruntime (its own outputs, bit for bit), torch.autograd on the same tiny op (each gradient rule),
and a subprocess where torch, onnx2torch and explainer cannot be imported (the file alone)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import explainer
from explainer.errors import InvalidParameterError, LayerNotFeatureMapError, UnsupportedModelError
from explainer.export import EXPORTERS, exportable_methods, exporter
from explainer.errors import ExportWriteError, UnsupportedHeadOpError
from explainer.export.head import gradient_model
from explainer.export.resize import pil_bicubic_matrix
from explainer.export.rules import RULES, rule

sys.path.insert(0, str(Path(__file__).parent))

TOLERANCE = 1e-4  # of the map's range


# helpers ------------------------------------------------------------------------------------------
def _session(model) -> ort.InferenceSession:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def _inputs(net, images, batch=None):
    pixels, _ = net.prepare(images)
    pixels = np.rint(pixels)
    if batch is not None:
        pixels = pixels[:batch]
    return pixels, net.to_model_input(pixels)


def _source_batch(net) -> int:
    dim = net.source_model.graph.input[0].type.tensor_type.shape.dim[0]
    return 1 if dim.HasField("dim_value") else 2


def _library_maps(net, pixels, classes, method="gradcam", layer=None, map_size="feature", runs_on="torch"):
    """The library's maps of each image for its classes: (N, K, h, w); by default from its torch path
    (forward and backward on the converted module), independent of the graphs under test (the library's
    own default, the in-graph path, runs the same branch as the exported file)."""
    from explainer.methods.gradcam import GradCAM
    from explainer.methods.gradcam_plus_plus import GradCAMPlusPlus

    cam = (GradCAM if method == "gradcam" else GradCAMPlusPlus)(net, layer, runs_on=runs_on)
    if map_size == "input":  # the public maps: resized to the image and cut at 0, as explainer.gradcam's
        return np.stack([cam(p.astype(np.uint8), [int(c) for c in cs]) for p, cs in zip(pixels, classes)])
    return np.stack([cam.low_resolution(p, [int(c) for c in cs]) for p, cs in zip(pixels, classes)])


def _relative_error(ours, reference) -> float:
    scale = float(reference.max() - reference.min()) or 1.0
    return float(np.abs(ours - reference).max()) / scale


def check_export(net, tmp_path, images, method="gradcam", layer=None, top_k=2, map_size="feature",
                 name="model.onnx", degenerate_below=None) -> float:
    """Export, run the file and the source in onnxruntime; asserts the source's outputs are
    bit-identical and returns the maps' largest error relative to their range. ``degenerate_below``:
    where the library refuses the map as carrying no signal (DegenerateMapError), the exported map
    (which a graph cannot refuse) must peak below this value instead."""
    path = explainer.export_explained(net, tmp_path / name, method=method, feature_layer=layer, top_k=top_k,
                                      map_size=map_size)
    onnx.checker.check_model(str(path), full_check=True)
    pixels, x = _inputs(net, images, _source_batch(net))
    source = _session(net.source_model)
    expected = source.run(None, {net.input.name: x})
    session = _session(path)
    names = [o.name for o in session.get_outputs()]
    assert names == [o.name for o in net.source_model.graph.output] + ["saliency", "saliency_class"]
    got = session.run(None, {net.input.name: x})
    for a, b in zip(expected, got):
        assert a.dtype == b.dtype and np.array_equal(a, b), "the source's outputs changed"
    saliency, classes = got[-2], got[-1]
    assert saliency.dtype == np.float32 and classes.dtype == np.int64
    assert classes.shape == (len(x), top_k) and saliency.shape[:2] == (len(x), top_k)
    scores = source.run([net.gradient_scores], {net.input.name: x})[0].reshape(len(x), -1) \
        if net.gradient_scores in names else None
    if scores is not None:  # the top K by score, best first
        np.testing.assert_array_equal(classes, np.argsort(-scores, axis=1, kind="stable")[:, :top_k])
    try:
        reference = _library_maps(net, pixels, classes, method, layer, map_size)
    except explainer.errors.DegenerateMapError:
        if degenerate_below is None:
            raise
        assert float(saliency.max()) <= degenerate_below
        return 0.0
    assert saliency.shape == reference.shape
    return _relative_error(saliency, reference)


# the rules, one tiny graph per op, against torch.autograd ----------------------------------------------
def _const(name, value):
    return numpy_helper.from_array(np.asarray(value, dtype=np.asarray(value).dtype), name)


def _case(nodes, shape, inits=(), opset=17, positive=False, seed=0):
    """(model with output __out = y * w, feeds, w): x -> nodes -> y."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32) * 2
    if positive:
        x = np.abs(x) + 0.5
    graph = helper.make_graph(nodes, "op", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])], initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    y = _session(model).run(["y"], {"x": x})[0]
    w = rng.standard_normal(y.shape).astype(np.float32)
    graph = model.graph  # make_model copied it
    graph.node.append(helper.make_node("Mul", ["y", "__w"], ["__out"]))
    graph.initializer.append(_const("__w", w))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("__out", TensorProto.FLOAT, list(y.shape)))
    onnx.checker.check_model(model, full_check=True)
    return model, {"x": x}, w


def _n(op, inputs, outputs=("y",), **attrs):
    return helper.make_node(op, list(inputs), list(outputs), **attrs)


def _rng(seed=1):
    return np.random.default_rng(seed)


W23 = _rng().standard_normal((3, 5)).astype(np.float32)
C31 = _rng(2).standard_normal((3, 1)).astype(np.float32)
CONV = _rng(3).standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3
CONV_G = _rng(4).standard_normal((6, 1, 3, 3)).astype(np.float32) * 0.3
LN_S, LN_B = _rng(5).standard_normal(5).astype(np.float32), _rng(6).standard_normal(5).astype(np.float32)
BN = [_rng(7 + i).standard_normal(3).astype(np.float32) for i in range(4)]
BN[3] = np.abs(BN[3]) + 0.1


def _torch_cases():
    import torch
    import torch.nn.functional as F

    t = torch.as_tensor
    i64 = lambda v: np.asarray(v, np.int64)  # noqa: E731
    cases = {
        # elementwise, with broadcasting (the constant's axes summed back) and both inputs the feature
        "Add": ([_n("Add", ["x", "c"])], (2, 3, 4), [_const("c", C31)], {}, lambda x: x + t(C31)),
        "Sub": ([_n("Sub", ["c", "x"])], (2, 3, 4), [_const("c", C31)], {}, lambda x: t(C31) - x),
        "Mul-self": ([_n("Mul", ["x", "x"])], (2, 3, 4), [], {}, lambda x: x * x),
        "Div": ([_n("Div", ["c", "x"])], (2, 3, 4), [_const("c", C31)], {"positive": True}, lambda x: t(C31) / x),
        "Div-by-const": ([_n("Div", ["x", "c"])], (2, 3, 4), [_const("c", C31 + 3)], {}, lambda x: x / t(C31 + 3)),
        "Pow": ([_n("Pow", ["x", "e"])], (2, 3), [_const("e", np.float32(2.0))], {}, lambda x: x ** 2),
        "Sqrt": ([_n("Sqrt", ["x"])], (2, 3), [], {"positive": True}, torch.sqrt),
        "Neg": ([_n("Neg", ["x"])], (2, 3), [], {}, lambda x: -x),
        "Exp": ([_n("Exp", ["x"])], (2, 3), [], {}, torch.exp),
        "Tanh": ([_n("Tanh", ["x"])], (2, 3), [], {}, torch.tanh),
        # activations
        "Relu": ([_n("Relu", ["x"])], (2, 3, 4), [], {}, torch.relu),
        "Clip": ([_n("Clip", ["x", "lo", "hi"])], (2, 3, 4), [_const("lo", np.float32(-1)), _const("hi", np.float32(1.5))],
                 {}, lambda x: x.clamp(-1, 1.5)),
        "Clip-relu6": ([_n("Clip", ["x", "lo", "hi"])], (2, 3, 4), [_const("lo", np.float32(0)), _const("hi", np.float32(1))],
                       {}, lambda x: x.clamp(0, 1)),
        "Sigmoid": ([_n("Sigmoid", ["x"])], (2, 3), [], {}, torch.sigmoid),
        "HardSigmoid": ([_n("HardSigmoid", ["x"], alpha=1 / 6, beta=0.5)], (4, 5), [], {}, F.hardsigmoid),
        "HardSwish": ([_n("HardSwish", ["x"])], (4, 5), [], {}, F.hardswish),
        "Erf": ([_n("Erf", ["x"])], (2, 3), [], {}, torch.erf),
        "Gelu": ([_n("Gelu", ["x"])], (2, 3), [], {"opset": 20}, F.gelu),
        "Gelu-tanh": ([_n("Gelu", ["x"], approximate="tanh")], (2, 3), [], {"opset": 20},
                      lambda x: F.gelu(x, approximate="tanh")),
        # shapes
        "Reshape": ([_n("Reshape", ["x", "s"])], (2, 3, 4), [_const("s", i64([2, 12]))], {}, lambda x: x.reshape(2, 12)),
        "Flatten": ([_n("Flatten", ["x"], axis=1)], (2, 3, 4), [], {}, lambda x: x.flatten(1)),
        "Transpose": ([_n("Transpose", ["x"], perm=[2, 0, 1])], (2, 3, 4), [], {}, lambda x: x.permute(2, 0, 1)),
        "Squeeze": ([_n("Squeeze", ["x", "a"])], (2, 1, 4), [_const("a", i64([1]))], {}, lambda x: x.squeeze(1)),
        "Unsqueeze": ([_n("Unsqueeze", ["x", "a"])], (2, 4), [_const("a", i64([0, 2]))], {}, lambda x: x[None, :, None]),
        "Identity-Dropout-Cast": ([_n("Identity", ["x"], ["a"]), _n("Dropout", ["a"], ["b"]),
                                   _n("Cast", ["b"], to=TensorProto.FLOAT)], (2, 3), [], {}, lambda x: x),
        "Expand": ([_n("Expand", ["x", "s"])], (3, 1), [_const("s", i64([2, 3, 4]))], {}, lambda x: x.expand(2, 3, 4)),
        "Concat": ([_n("Concat", ["x", "c", "x"], axis=1)], (3, 2), [_const("c", C31)], {},
                   lambda x: torch.cat([x, t(C31), x], 1)),
        "Split": ([_n("Split", ["x", "s"], ["a", "b"], axis=1), _n("Mul", ["a", "b"])], (2, 4),
                  [_const("s", i64([2, 2]))], {}, lambda x: x[:, :2] * x[:, 2:]),
        "Slice": ([_n("Slice", ["x", "s", "e", "a"])], (3, 6, 4), [_const("s", i64([1, -3])), _const("e", i64([100, -1])),
                                                                  _const("a", i64([1, 2]))], {}, lambda x: x[:, 1:, -3:-1]),
        "Gather-scalar": ([_n("Gather", ["x", "i"], axis=1)], (2, 5, 3), [_const("i", np.int64(0))], {}, lambda x: x[:, 0]),
        "Gather-repeat": ([_n("Gather", ["x", "i"], axis=1)], (2, 5, 3), [_const("i", i64([4, 1, 4]))], {},
                          lambda x: x[:, [4, 1, 4]]),
        "Gather-2d": ([_n("Gather", ["x", "i"], axis=0)], (5, 3), [_const("i", i64([[0, 2], [2, -1]]))], {},
                      lambda x: x[torch.tensor([[0, 2], [2, 4]])]),
        # reductions and pools
        "ReduceMean": ([_n("ReduceMean", ["x", "a"], keepdims=0)], (2, 3, 4), [_const("a", i64([1, 2]))], {"opset": 18},
                       lambda x: x.mean((1, 2))),
        "ReduceMean-13": ([_n("ReduceMean", ["x"], axes=[-1], keepdims=1)], (2, 3, 4), [], {"opset": 13},
                          lambda x: x.mean(-1, keepdim=True)),
        "ReduceSum": ([_n("ReduceSum", ["x", "a"], keepdims=0)], (2, 3, 4), [_const("a", i64([0]))], {}, lambda x: x.sum(0)),
        "GlobalAveragePool": ([_n("GlobalAveragePool", ["x"])], (2, 3, 4, 5), [], {}, lambda x: x.mean((2, 3), keepdim=True)),
        "AveragePool-whole": ([_n("AveragePool", ["x"], kernel_shape=[4, 5])], (2, 3, 4, 5), [], {},
                              lambda x: F.avg_pool2d(x, (4, 5))),
        "AveragePool-pads": ([_n("AveragePool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1])],
                             (1, 2, 6, 6), [], {}, lambda x: _ort_pool(x)),
        "AveragePool-include": ([_n("AveragePool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                                    count_include_pad=1)], (1, 2, 6, 6), [], {},
                                lambda x: F.avg_pool2d(x, 3, 2, padding=1, count_include_pad=True)),
        "MaxPool": ([_n("MaxPool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])], (2, 3, 7, 6), [], {},
                    lambda x: F.max_pool2d(x, 3, 2, padding=1)),
        "MaxPool-ceil": ([_n("MaxPool", ["x"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)], (1, 2, 5, 5), [], {},
                         lambda x: F.max_pool2d(x, 2, 2, ceil_mode=True)),
        "GlobalMaxPool": ([_n("GlobalMaxPool", ["x"])], (2, 3, 4, 5), [], {}, lambda x: x.amax((2, 3), keepdim=True)),
        "ReduceMax": ([_n("ReduceMax", ["x", "a"], keepdims=0)], (2, 5, 3), [_const("a", i64([1]))], {"opset": 18},
                      lambda x: x.amax(1)),
        "ReduceMax-13": ([_n("ReduceMax", ["x"], axes=[-1, 1], keepdims=1)], (2, 3, 4), [], {"opset": 13},
                         lambda x: x.amax((1, 2), keepdim=True)),
        "ReduceMin": ([_n("ReduceMin", ["x"], keepdims=0)], (2, 3, 4), [], {"opset": 13}, lambda x: x.amin()),
        # linear algebra
        "MatMul": ([_n("MatMul", ["x", "w"])], (2, 4, 3), [_const("w", W23)], {}, lambda x: x @ t(W23)),
        "MatMul-both": ([_n("Transpose", ["x"], ["xt"], perm=[0, 2, 1]), _n("MatMul", ["x", "xt"])], (2, 4, 3), [], {},
                        lambda x: x @ x.transpose(1, 2)),
        "Gemm": ([_n("Gemm", ["x", "w", "b"], alpha=0.5, beta=2.0, transB=1)], (4, 5),
                 [_const("w", W23), _const("b", C31[:, 0])], {}, lambda x: 0.5 * x @ t(W23).T + 2.0 * t(C31[:, 0])),
        "Gemm-transA": ([_n("Gemm", ["x", "w"], transA=1)], (3, 4), [_const("w", W23)], {}, lambda x: x.T @ t(W23)),
        "Conv": ([_n("Conv", ["x", "w"], strides=[2, 2], pads=[1, 1, 1, 1])], (2, 3, 7, 6), [_const("w", CONV)], {},
                 lambda x: F.conv2d(x, t(CONV), stride=2, padding=1)),
        "Conv-1x1": ([_n("Conv", ["x", "w"])], (2, 3, 4, 4), [_const("w", CONV[:, :, :1, :1].copy())], {},
                     lambda x: F.conv2d(x, t(CONV[:, :, :1, :1].copy()))),
        "Conv-groups": ([_n("Conv", ["x", "w"], group=3, pads=[1, 1, 1, 1])], (1, 3, 5, 5), [_const("w", CONV_G)], {},
                        lambda x: F.conv2d(x, t(CONV_G), padding=1, groups=3)),
        # normalisation and softmax
        "Softmax": ([_n("Softmax", ["x"], axis=-1)], (2, 3, 5), [], {}, lambda x: torch.softmax(x, -1)),
        "Softmax-opset11": ([_n("Softmax", ["x"], axis=1)], (2, 3, 5), [], {"opset": 11},
                            lambda x: torch.softmax(x.reshape(2, 15), 1).reshape(2, 3, 5)),
        "LayerNormalization": ([_n("LayerNormalization", ["x", "s", "b"], epsilon=1e-5)], (2, 3, 5),
                               [_const("s", LN_S), _const("b", LN_B)], {},
                               lambda x: F.layer_norm(x, (5,), t(LN_S), t(LN_B), 1e-5)),
        "BatchNormalization": ([_n("BatchNormalization", ["x", "g", "b", "m", "v"], epsilon=1e-3)], (2, 3, 4, 4),
                               [_const(k, v) for k, v in zip("gbmv", BN)], {},
                               lambda x: F.batch_norm(x, t(BN[2]), t(BN[3]), t(BN[0]), t(BN[1]), eps=1e-3)),
    }
    return cases


def _ort_pool(x):
    """onnxruntime's AveragePool with end pads and count_include_pad=0, as a differentiable torch
    expression: the window sums over the divisor of valid pixels."""
    import torch.nn.functional as F

    sums = F.avg_pool2d(F.pad(x, (0, 1, 0, 1)), 3, 2, divisor_override=1)
    ones = F.avg_pool2d(F.pad(x.new_ones(x.shape), (0, 1, 0, 1)), 3, 2, divisor_override=1)
    return sums / ones


CASES = sorted(_torch_cases())


@pytest.mark.parametrize("case", CASES)
def test_gradient_rule_equals_torch_autograd(case):
    import torch

    nodes, shape, inits, options, reference = _torch_cases()[case]
    model, feeds, w = _case(nodes, shape, inits, **options)
    written = gradient_model(model, "x", "__out", feeds)
    onnx.checker.check_model(written, full_check=True)
    got = _session(written).run(["gradient"], feeds)[0]
    x = torch.tensor(feeds["x"], requires_grad=True)
    (reference(x) * torch.tensor(w)).sum().backward()
    expected = x.grad.numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_quantize_dequantize_is_straight_through_with_saturation():
    """The library's straight-through rule (explainer/convert/converters/quantization.py): the
    gradient passes where round(x/s) + z is inside the integer range, 0 where it saturates."""
    scale, zero = np.float32(0.05), np.uint8(10)
    nodes = [_n("QuantizeLinear", ["x", "s", "z"], ["q"]), _n("DequantizeLinear", ["q", "s", "z"])]
    model, feeds, w = _case(nodes, (3, 40), [_const("s", scale), _const("z", zero)])
    got = _session(gradient_model(model, "x", "__out", feeds)).run(["gradient"], feeds)[0]
    unclamped = np.round(feeds["x"] / scale) + 10
    expected = w * ((unclamped >= 0) & (unclamped <= 255))
    assert 0 < np.count_nonzero(expected == 0) < expected.size  # both cases occur
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_every_op_the_issue_names_has_a_rule():
    named = {"Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze",
             "GlobalAveragePool", "ReduceMean", "AveragePool", "Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish",
             "Softmax", "LayerNormalization", "Erf", "Gelu", "Concat", "Slice", "Gather", "Conv", "Identity", "Dropout",
             "BatchNormalization", "QuantizeLinear", "DequantizeLinear", "Cast"}
    assert named - set(RULES) == set()


def test_registries_refuse_duplicates():
    with pytest.raises(ValueError, match="Relu"):
        rule("Relu")(lambda b, node, grads: grads)
    with pytest.raises(ValueError, match="gradcam"):
        exporter("gradcam")(lambda ctx: "")
    assert {"gradcam", "gradcam_plus_plus"} <= set(exportable_methods()) == set(EXPORTERS)


def test_resize_matrices_are_pils_bicubic():
    from PIL import Image

    rng = np.random.default_rng(0)
    for (h, w), (height, width) in [((7, 7), (224, 224)), ((6, 9), (50, 31)), ((20, 20), (7, 9))]:
        m = rng.standard_normal((h, w)).astype(np.float32)
        ours = pil_bicubic_matrix(h, height) @ m.astype(np.float64) @ pil_bicubic_matrix(w, width).T
        pil = np.asarray(Image.fromarray(m).resize((width, height), Image.BICUBIC), np.float64)
        np.testing.assert_allclose(ours, pil, atol=1e-5 * np.abs(m).max())


# small classifiers built in code ---------------------------------------------------------------------
def _classifier(head_nodes, head_inits, *, size=16, channels=6, classes=5, opset=17, seed=0):
    """image (N, 3, size, size) -> Conv 3x3 -> Relu ("feature") -> head -> "scores" -> Softmax."""
    rng = np.random.default_rng(seed)
    conv = (rng.standard_normal((channels, 3, 3, 3)) * 0.2).astype(np.float32)
    nodes = [_n("Conv", ["image", "conv_w"], ["pre"], pads=[1, 1, 1, 1]), _n("Relu", ["pre"], ["feature"], name="feature")]
    nodes += head_nodes + [_n("Softmax", ["scores"], ["probabilities"], axis=-1)]
    inits = [_const("conv_w", conv)] + list(head_inits)
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size])],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return explainer.load(model, preprocessing="imagenet", device="cpu")


def _w(*shape, seed=0, scale=0.3):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _small_heads():
    i64 = lambda v: np.asarray(v, np.int64)  # noqa: E731
    c, k = 6, 5
    return {
        # CNN heads: pools, 1x1 convs, activations, squeeze-excitation style broadcasting, Gemm/MatMul
        "gap-gemm": ([_n("GlobalAveragePool", ["feature"], ["p"]), _n("Flatten", ["p"], ["f"]),
                      _n("Gemm", ["f", "w", "b"], ["scores"], transB=1)], [_const("w", _w(k, c)), _const("b", _w(k, seed=1))]),
        "conv1x1-hardswish": ([_n("Conv", ["feature", "w1", "b1"], ["h"]), _n("HardSwish", ["h"], ["hs"]),
                               _n("ReduceMean", ["hs"], ["p"], axes=[2, 3], keepdims=0), _n("MatMul", ["p", "w"], ["m"]),
                               _n("Add", ["m", "b"], ["scores"])],
                              [_const("w1", _w(8, c, 1, 1)), _const("b1", _w(8, seed=2)),
                               _const("w", _w(8, k, seed=3)), _const("b", _w(k, seed=4))]),
        "squeeze-excite": ([_n("GlobalAveragePool", ["feature"], ["g"]), _n("Sigmoid", ["g"], ["s"]),
                            _n("Mul", ["feature", "s"], ["e"]), _n("Clip", ["e", "lo", "hi"], ["r6"]),
                            _n("HardSigmoid", ["r6"], ["hsig"]), _n("Sub", ["hsig", "half"], ["d"]),
                            _n("Div", ["d", "two"], ["dd"]),
                            _n("AveragePool", ["dd"], ["p"], kernel_shape=[16, 16]), _n("Reshape", ["p", "shape"], ["f"]),
                            _n("Gemm", ["f", "w"], ["scores"])],
                           [_const("lo", np.float32(0)), _const("hi", np.float32(6)), _const("half", np.float32(0.5)),
                            _const("two", np.float32(2)), _const("shape", i64([-1, c])), _const("w", _w(c, k))]),
        "batchnorm-pads-pool": ([_n("BatchNormalization", ["feature", "g", "bb", "m", "v"], ["bn"]),
                                 _n("AveragePool", ["bn"], ["p"], kernel_shape=[8, 8], strides=[8, 8], pads=[0, 0, 1, 1]),
                                 _n("Dropout", ["p"], ["dp"]), _n("Flatten", ["dp"], ["f"]),
                                 _n("Gemm", ["f", "w"], ["scores"], transB=1)],
                                [_const("g", _w(c) + 1), _const("bb", _w(c, seed=5)), _const("m", _w(c, seed=6)),
                                 _const("v", np.abs(_w(c, seed=7)) + 0.5), _const("w", _w(k, c * 4, seed=8))]),
        # a transformer head on tokens: class token, layer norm, attention, GELU (Erf), class-token readout
        "tokens-attention": ([_n("Reshape", ["feature", "tshape"], ["t0"]), _n("Transpose", ["t0"], ["tokens"], perm=[0, 2, 1]),
                              _n("Shape", ["tokens"], ["ts"]), _n("Gather", ["ts", "zero"], ["n"]),
                              _n("Unsqueeze", ["n", "ax0"], ["n1"]), _n("Concat", ["n1", "one_c"], ["cls_shape"], axis=0),
                              _n("Expand", ["cls", "cls_shape"], ["cls_n"]),
                              _n("Concat", ["cls_n", "tokens"], ["x"], axis=1),
                              _n("LayerNormalization", ["x", "ln_s", "ln_b"], ["xn"]),
                              _n("MatMul", ["xn", "wq"], ["q"]), _n("MatMul", ["xn", "wk"], ["kk"]),
                              _n("Transpose", ["kk"], ["kt"], perm=[0, 2, 1]), _n("MatMul", ["q", "kt"], ["a0"]),
                              _n("Mul", ["a0", "scale"], ["a1"]), _n("Softmax", ["a1"], ["att"], axis=-1),
                              _n("MatMul", ["att", "xn"], ["ctx"]), _n("Add", ["x", "ctx"], ["res"]),
                              _n("Div", ["res", "sqrt2"], ["r2"]), _n("Erf", ["r2"], ["er"]), _n("Add", ["er", "one"], ["e1"]),
                              _n("Mul", ["res", "e1"], ["e2"]), _n("Mul", ["e2", "half"], ["gelu"]),
                              _n("Slice", ["gelu", "s0", "s1", "s_ax"], ["first"]), _n("Squeeze", ["first", "s_ax"], ["clst"]),
                              _n("Split", ["clst", "split"], ["left", "right"], axis=1),
                              _n("Concat", ["right", "left"], ["sw"], axis=1),
                              _n("Gemm", ["sw", "w"], ["scores"])],
                             [_const("tshape", i64([0, c, 256])), _const("zero", np.int64(0)), _const("ax0", i64([0])),
                              _const("one_c", i64([1, c])), _const("cls", _w(1, 1, c, seed=9)),
                              _const("ln_s", _w(c, seed=10) + 1), _const("ln_b", _w(c, seed=11)),
                              _const("wq", _w(c, c, seed=12)), _const("wk", _w(c, c, seed=13)),
                              _const("scale", np.float32(c ** -0.5)), _const("sqrt2", np.float32(np.sqrt(2))),
                              _const("one", np.float32(1)), _const("half", np.float32(0.5)),
                              _const("s0", i64([0])), _const("s1", i64([1])), _const("s_ax", i64([1])),
                              _const("split", i64([2, 4])), _const("w", _w(c, k, seed=14))]),
    }


@pytest.mark.parametrize("head", sorted(_small_heads()))
@pytest.mark.parametrize("method", ["gradcam", "gradcam_plus_plus"])
def test_small_graphs_equal_library(head, method, tmp_path, chelsea, coffee):
    nodes, inits = _small_heads()[head]
    net = _classifier(nodes, inits)
    assert net.layer("feature").output == "feature"
    error = check_export(net, tmp_path, [chelsea, coffee], method, layer="feature", top_k=2)
    assert error <= TOLERANCE


def test_unsupported_head_op_is_a_typed_error_naming_recipro_cam(tmp_path):
    c, k = 6, 5
    net = _classifier([_n("Selu", ["feature"], ["s"]), _n("GlobalMaxPool", ["s"], ["p"]), _n("Flatten", ["p"], ["f"]),
                       _n("Gemm", ["f", "w"], ["scores"], transB=1)], [_const("w", _w(k, c))])
    out = tmp_path / "x.onnx"
    with pytest.raises(UnsupportedHeadOpError, match="Selu.*recipro_cam") as caught:
        explainer.export_explained(net, out, feature_layer="feature")
    assert isinstance(caught.value, UnsupportedModelError)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary file


# the embedded model and GoogLeNet's graph ---------------------------------------------------------------
@pytest.mark.parametrize("method,map_size,top_k", [("gradcam", "feature", 3), ("gradcam_plus_plus", "input", 1)])
def test_default_model_equals_library(default_net, tmp_path, chelsea, method, map_size, top_k):
    error = check_export(default_net, tmp_path, [chelsea], method, top_k=top_k, map_size=map_size)
    assert error <= TOLERANCE


def test_default_models_branch_reads_the_sources_scores_and_gathers_the_classes_weights(default_net, tmp_path, chelsea):
    """The branch on the embedded model (feature -> GlobalAveragePool -> Flatten -> Gemm) computes only
    what the map needs: the classes ranked on the source's own scores (no second Gemm), the weights of
    the explained classes gathered (no product of a one-hot seed with the weight matrix), the channel
    weights from the pooled gradient (no (K, N, C, h, w) gradient), the feature read as it is (no copy
    of it). The source's nodes and outputs are as they were, and the maps are the library's."""
    path = explainer.export_explained(default_net, tmp_path / "e.onnx", top_k=1)
    model = onnx.load(str(path))
    source = default_net.source_model
    assert [n.SerializeToString() for n in model.graph.node[:len(source.graph.node)]] == \
        [n.SerializeToString() for n in source.graph.node]
    branch = model.graph.node[len(source.graph.node):]
    ops = sorted({n.op_type for n in branch})
    assert not {"Gemm", "Where", "Expand", "Equal", "GlobalAveragePool", "ReduceMean"} & set(ops), ops
    assert [n.op_type for n in branch].count("MatMul") == 1 and "Gather" in ops and "TopK" in ops
    scores = default_net.gradient_scores
    assert any(scores in n.input for n in branch)  # TopK reads the source's own scores (via Flatten)
    assert any(default_net.layer(explainer.gradcam_layers(default_net).feature).output in n.input for n in branch)
    error = check_export(default_net, tmp_path, [chelsea], "gradcam", top_k=1)
    assert error <= TOLERANCE


def test_googlenet_light_graph_equals_library(tmp_path, chelsea):
    """GoogLeNet's graph from the onnx wheel: opset 9, IR 3 (constants as nodes), AveragePool 7x7 with
    asymmetric pads and count_include_pad=0, Dropout, Reshape, Gemm, Softmax."""
    path = Path(onnx.__file__).parent / "backend/test/data/light/light_inception_v1.onnx"
    net = explainer.load(str(path), device="cpu")
    assert check_export(net, tmp_path, [chelsea], top_k=2, map_size="input") <= TOLERANCE
    written = onnx.load(str(tmp_path / "model.onnx"))
    assert written.opset_import[0].version == 9 and written.ir_version == net.source_model.ir_version


def test_target_input_and_batch(default_net, tmp_path, chelsea, coffee):
    net = default_net
    path = explainer.export_explained(net, tmp_path / "t.onnx", top_k=0)
    session = _session(path)
    assert [(i.name, i.type) for i in session.get_inputs()][-1] == ("target", "tensor(int64)")
    pixels, x = _inputs(net, [chelsea, coffee])
    if _source_batch(net) == 1:
        pixels, x = pixels[:1], x[:1]
    target = np.array([281, 967][:len(x)], np.int64)
    saliency, classes = session.run(["saliency", "saliency_class"], {net.input.name: x, "target": target})
    np.testing.assert_array_equal(classes[:, 0], target)
    reference = _library_maps(net, pixels, classes)
    assert _relative_error(saliency, reference) <= TOLERANCE


def test_metadata_and_reload(default_net, tmp_path):
    path = explainer.export_explained(default_net, tmp_path / "m.onnx", method="gradcam_plus_plus", top_k=2)
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["onnx_explainer.export.method"] == "gradcam_plus_plus"
    assert meta["onnx_explainer.export.layer"] == explainer.gradcam_layers(default_net).feature
    assert meta["onnx_explainer.version"] == explainer.__version__
    assert json.loads(meta["onnx_explainer.labels"]) == list(default_net.class_names)
    again = explainer.load(str(path), device="cpu")
    assert again.preprocessing == default_net.preprocessing and again.class_names == default_net.class_names


# bad input: one typed error each, nothing written ----------------------------------------------------------
def test_bad_input_is_refused_before_anything_is_written(default_net, tmp_path):
    net = default_net
    with pytest.raises(InvalidParameterError, match="exportable methods: gradcam"):
        explainer.export_explained(net, tmp_path / "a.onnx", method="occlusion")
    with pytest.raises(LayerNotFeatureMapError, match="feature_layer"):
        explainer.export_explained(net, tmp_path / "a.onnx", feature_layer=net.layers()[-1].name)
    with pytest.raises(InvalidParameterError, match="top_k"):
        explainer.export_explained(net, tmp_path / "a.onnx", top_k=net.num_classes + 1)
    with pytest.raises(InvalidParameterError, match="map_size"):
        explainer.export_explained(net, tmp_path / "a.onnx", map_size="full")
    with pytest.raises(ExportWriteError, match="does not exist"):
        explainer.export_explained(net, tmp_path / "missing" / "a.onnx")
    with pytest.raises(ExportWriteError, match="is a folder"):
        explainer.export_explained(net, tmp_path)
    assert list(tmp_path.iterdir()) == []
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ExportWriteError, match="not writable"):
            explainer.export_explained(net, locked / "a.onnx")


def test_cli_export(tmp_path, capsys):
    from explainer.cli import main

    out = tmp_path / "cli.onnx"
    assert main(["export", "efficientnet_lite0", "--out", str(out), "--top-k", "2", "--map-size", "input"]) == 0
    session = _session(out)
    assert [o.name for o in session.get_outputs()][-2:] == ["saliency", "saliency_class"]
    assert session.get_outputs()[-2].shape[1] == 2
    assert main(["export", "efficientnet_lite0", "--out", str(tmp_path / "x.onnx"), "--method", "lime"]) == 2
    assert "exportable methods" in capsys.readouterr().err


# onnxruntime alone -------------------------------------------------------------------------------------------
BLOCKER = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'onnx2torch', 'explainer', 'torchvision', 'timm'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Blocker())
for blocked in ('torch', 'onnx2torch', 'explainer'):
    try:
        __import__(blocked)
    except ImportError:
        pass
    else:
        raise SystemExit(blocked + ' imported')
import numpy as np, onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])
x = np.load(sys.argv[2])
out = session.run(['saliency', 'saliency_class'], {session.get_inputs()[0].name: x})
np.save(sys.argv[3], out[0]); np.save(sys.argv[4], out[1])
"""


def test_exported_file_runs_with_onnxruntime_alone(default_net, tmp_path, chelsea):
    net = default_net
    path = explainer.export_explained(net, tmp_path / "alone.onnx", top_k=2, map_size="input")
    pixels, x = _inputs(net, [chelsea])
    np.save(tmp_path / "x.npy", x)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", BLOCKER, str(path), str(tmp_path / "x.npy"), str(tmp_path / "s.npy"),
                    str(tmp_path / "c.npy")], check=True, env=env, cwd=tmp_path, timeout=120)
    saliency, classes = np.load(tmp_path / "s.npy"), np.load(tmp_path / "c.npy")
    reference = _library_maps(net, pixels, classes, map_size="input")
    assert _relative_error(saliency, reference) <= TOLERANCE


# the compatibility suite's families (tests/compat.py exports) ----------------------------------------------
MAIN_FAMILIES = [("vit_tiny", "legacy"), ("deit_tiny_distilled", "dynamo"), ("swin_timm", "legacy"),
                 ("convnext_atto", "dynamo")]
ALL_FAMILIES = [(f, e) for f in ("resnet18", "mobilenet_v3_small", "googlenet", "swin_tv", "efficientnet_b0",
                                 "convnext_atto", "regnetx_002", "densenet121", "vit_tiny", "deit_tiny_distilled",
                                 "swin_timm", "mobilevit_xxs", "levit_128s", "cait_xxs24", "edgenext_xx_small")
                for e in ("legacy", "dynamo")]


def _family(family, exporter_name):
    import exports

    return explainer.load(exports.export(family, exporter_name), device="cpu")


@pytest.mark.parametrize("family,exporter_name", MAIN_FAMILIES)
def test_families_equal_library(family, exporter_name, tmp_path, chelsea, coffee):
    """Tokens after class tokens (ViT, DeiT), channels-last grids (Swin), ConvNeXt's permuted norm,
    MobileNetV3's Hardswish head: the exported Grad-CAM equals the library's."""
    net = _family(family, exporter_name)
    assert check_export(net, tmp_path, [chelsea, coffee], "gradcam", top_k=2) <= TOLERANCE


def _branch_attention_rows(path, net, x) -> list[int]:
    """The query rows of every Softmax over the keys in the explanation branch of an exported file
    (its second-to-last axis), measured on onnxruntime."""
    model = onnx.load(str(path))
    softmaxes = [n.output[0] for n in model.graph.node if n.op_type == "Softmax" and n.name.startswith("explain/")]
    for name in softmaxes:
        model.graph.output.append(onnx.ValueInfoProto(name=name))
    got = _session(model).run(softmaxes, {net.input.name: x}) if softmaxes else []
    return [int(a.shape[-2]) for a in got]


def test_vit_gradient_reads_the_class_token_early(tmp_path, chelsea, coffee, monkeypatch):
    """On a ViT the gradient runs through the head that picks the class token as early as the ops
    allow (``export.head.early_head``): the branch's attention has one query row instead of 197, here
    through Reshape targets computed from Shapes (a dynamic-batch export; constant targets: the
    Recipro-CAM ViT tests), and the maps still equal the library's torch path. Where the early head's
    scores would differ from the whole head's, the whole head is differentiated (the maps equal the
    library's all the same)."""
    import explainer.export.head as head_module

    net = _family("vit_tiny", "legacy-dynamic")
    assert check_export(net, tmp_path, [chelsea, coffee], "gradcam", top_k=2) <= TOLERANCE
    x = _inputs(net, [chelsea], 1)[1]
    assert _branch_attention_rows(tmp_path / "model.onnx", net, x) == [1]
    select = head_module.select_early

    def wrong_token(model, layout, values=None):  # reads token 1 instead of the class token
        out = select(model, layout, values)
        for t in out.graph.initializer:
            if t.name == "recipro_early/starts":
                t.CopyFrom(onnx.numpy_helper.from_array(np.asarray([1], np.int64), t.name))
            elif t.name == "recipro_early/ends":
                t.CopyFrom(onnx.numpy_helper.from_array(np.asarray([2], np.int64), t.name))
        return out

    monkeypatch.setattr(head_module, "select_early", wrong_token)
    assert check_export(net, tmp_path, [chelsea, coffee], "gradcam", top_k=2, name="whole.onnx") <= TOLERANCE
    assert _branch_attention_rows(tmp_path / "whole.onnx", net, x) == [197]


@pytest.mark.published
@pytest.mark.parametrize("family,exporter_name", ALL_FAMILIES)
def test_every_family_equals_library(family, exporter_name, tmp_path, chelsea, coffee):
    """Every family of the compatibility suite, both exporters, Grad-CAM and Grad-CAM++ (where the
    library refuses a Grad-CAM++ map with no signal -- LeViT's, CaiT's top class -- the exported map is
    at noise level: 1e-6 of the Grad-CAM map's peak)."""
    net = _family(family, exporter_name)
    assert check_export(net, tmp_path, [chelsea, coffee], "gradcam", top_k=2) <= TOLERANCE
    peak = float(_session(tmp_path / "model.onnx").run(["saliency"], {net.input.name: _inputs(net, [chelsea], 1)[1]})[0].max())
    assert check_export(net, tmp_path, [chelsea], "gradcam_plus_plus", top_k=1, name="pp.onnx",
                        degenerate_below=1e-6 * peak) <= TOLERANCE


def _torch_gradient_ort_activations(net, pixels, classes):
    """Grad-CAM from the library's gradient (torch.autograd on the converted module, straight-through
    through Q/DQ) and onnxruntime's activations of the feature layer: (N, K, h, w)."""
    import torch

    from explainer.runtime.torch_engine import torch_engine

    layer = explainer.gradcam_layers(net).feature
    engine = torch_engine(net)
    maps = []
    for p, cs in zip(pixels, classes):
        acts = net.activations(p.astype(np.uint8), layer)  # (C, h, w) from onnxruntime
        x = engine.tensor(p).permute(2, 0, 1)[None].requires_grad_(True)
        rows = []
        for c in cs:
            with torch.enable_grad(), engine.capture([layer]) as captured:
                score = engine.pixel_model(x).reshape(1, -1)[0, int(c)]
                grad = captured.gradient(score, layer).detach().numpy()[0]
            weights = grad.mean(axis=(1, 2))
            rows.append(np.maximum((weights[:, None, None] * acts).sum(0), 0))
        maps.append(np.stack(rows))
    return np.stack(maps)


@pytest.mark.published
@pytest.mark.parametrize("family", ["mobilenet_v3_small", "resnet18"])
def test_int8_qdq_export_equals_torch_gradient_on_onnxruntime_activations(family, tmp_path, chelsea):
    """int8 QDQ exports: the exported map is onnxruntime's int8 activations weighted by the
    straight-through gradient. The library's Grad-CAM takes its activations from the converted module,
    which rounds some of them one step apart (MobileNetV3-Small: 8 % of the feature layer's values),
    and its map then correlates only 0.80 with the export's on MobileNetV3-Small (0.997 on ResNet-18);
    with onnxruntime's activations the two agree within the tight bound."""
    import exports

    net = explainer.load(exports.export(family, "legacy", "int8-qdq"), device="cpu")
    path = explainer.export_explained(net, tmp_path / "q.onnx", top_k=2)
    pixels, x = _inputs(net, [chelsea], 1)
    source = _session(net.source_model).run(None, {net.input.name: x})
    got = _session(path).run(None, {net.input.name: x})
    assert all(np.array_equal(a, b) for a, b in zip(source, got))
    reference = _torch_gradient_ort_activations(net, pixels, got[-1])
    assert _relative_error(got[-2], reference) <= TOLERANCE


def test_ingraph_engine_equals_library(default_net, chelsea, coffee):
    """``export.engine.cam_maps`` (the library's in-graph path, point 5): several classes per image,
    a batch, one onnxruntime call."""
    from explainer.export.engine import cam_maps

    pixels, x = _inputs(default_net, [chelsea, coffee])
    targets = np.array([[281, 285, 3], [967, 504, 3]], np.int64)
    maps = cam_maps(default_net, x, targets)
    assert maps.shape[:2] == (2, 3)
    assert _relative_error(maps, _library_maps(default_net, pixels, targets)) <= TOLERANCE


def test_external_data(default_net, tmp_path, chelsea):
    """``external_data=True`` writes the weights beside the model (NAME.data), checked and complete."""
    path = explainer.export_explained(default_net, tmp_path / "e.onnx", external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.onnx", "e.onnx.data"]
    assert path.stat().st_size < 1_000_000
    _, x = _inputs(default_net, [chelsea])
    expected = _session(default_net.source_model).run(None, {default_net.input.name: x})
    got = _session(path).run(None, {default_net.input.name: x})
    assert all(np.array_equal(a, b) for a, b in zip(expected, got))


def test_conv_feature_in_a_fused_residual_block(tmp_path, chelsea, coffee):
    """A Conv output as the feature layer, inside Conv + Add + Relu (which onnxruntime fuses into one
    node) and beside a residual branch's Conv: the branch computes both again rather than reading them,
    so the source's fused nodes and its outputs stay as they were."""
    rng = np.random.default_rng(3)
    c, k = 8, 5
    conv = lambda *shape: (rng.standard_normal(shape) * 0.2).astype(np.float32)  # noqa: E731
    nodes = [_n("Conv", ["image", "w0"], ["a0"], pads=[1, 1, 1, 1], strides=[2, 2]), _n("Relu", ["a0"], ["r0"]),
             _n("Conv", ["r0", "w1"], ["c1"], pads=[1, 1, 1, 1], name="feature_conv"),
             _n("Conv", ["r0", "w2", "b2"], ["side"], name="side_conv"),
             _n("Add", ["c1", "side"], ["sum"]), _n("Relu", ["sum"], ["r1"]),
             _n("GlobalAveragePool", ["r1"], ["p"]), _n("Flatten", ["p"], ["f"]), _n("Gemm", ["f", "w"], ["scores"]),
             _n("Softmax", ["scores"], ["probabilities"], axis=-1)]
    inits = [_const("w0", conv(c, 3, 3, 3)), _const("w1", conv(c, c, 3, 3)), _const("w2", conv(c, c, 1, 1)),
             _const("b2", conv(c)), _const("w", conv(c, k))]
    graph = helper.make_graph(nodes, "residual", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", k])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    net = explainer.load(model, preprocessing="imagenet", device="cpu")
    assert check_export(net, tmp_path, [chelsea, coffee], layer="feature_conv", top_k=2) <= TOLERANCE


@pytest.mark.parametrize("preprocessing", ["imagenet", "caffe", "tf", "default"])
def test_ingraph_engine_normalises_the_pixels_itself_bit_for_bit(preprocessing, default_net, chelsea, coffee):
    """The library's session takes the images' pixels and normalises them in the graph (channel order,
    scale, mean, std, NCHW): its maps and noise scales equal, bit for bit, those of the same branch fed
    ``net.to_model_input`` (numpy's float32 operations), for ImageNet's, Caffe's (BGR) and TF's
    preprocessing and the embedded model's own."""
    from explainer.export.engine import cam_maps, pixel_cam_maps, session, takes_pixels

    if preprocessing == "default":
        net = default_net
    else:
        nodes, inits = _small_heads()["gap-gemm"]
        net = _classifier(nodes, inits)
        net = explainer.load(net.source_model, preprocessing=preprocessing, device="cpu")
    pixels = np.stack([net.fit_pixels(np.asarray(i, np.float32)) for i in (chelsea, coffee)])
    pixels[0, :3, :3] = [0.0, 255.0, 127.5]  # the ends of the range too
    targets = np.array([[1, 3], [4, 0]], np.int64)
    assert takes_pixels(session(net))
    expected = cam_maps(net, net.to_model_input(pixels), targets, with_unaveraged=True)
    got = pixel_cam_maps(net, pixels, targets, with_unaveraged=True)
    assert all(np.array_equal(a, b) for a, b in zip(expected, got))
    assert not takes_pixels(session(net, pixels=False))


def test_ingraph_engine_gives_the_library_its_noise_scale(default_net, chelsea):
    """The unaveraged peak the library's refusal of noise-level maps compares with, from the graph."""
    import torch

    from explainer.export.engine import cam_maps
    from explainer.runtime.torch_engine import torch_engine

    pixels, x = _inputs(default_net, [chelsea])
    _, unaveraged = cam_maps(default_net, x, [[281, 3]], with_unaveraged=True)
    layer = explainer.gradcam_layers(default_net).feature
    engine = torch_engine(default_net)
    expected = []
    for c in (281, 3):
        t = engine.tensor(pixels[0]).permute(2, 0, 1)[None].requires_grad_(True)
        with torch.enable_grad(), engine.capture([layer]) as captured:
            score = engine.pixel_model(t).reshape(1, -1)[0, c]
            g = captured.gradient(score, layer).detach()
            a = captured[layer].detach()
        expected.append(float((g.abs().mean(dim=(2, 3))[:, :, None, None] * a.abs()).sum(1).amax()))
    np.testing.assert_allclose(unaveraged[0], expected, rtol=1e-4)


# the library's own Grad-CAM runs in the graph (point 5) ----------------------------------------------------
def _public_and_low(net, images, labels, method="gradcam", layer=None, runs_on="auto"):
    """(public maps, low-resolution maps (N, K, h, w), the CAM) of ``images`` for ``labels``."""
    from explainer.methods.gradcam import GradCAM
    from explainer.methods.gradcam_plus_plus import GradCAMPlusPlus

    cam = (GradCAM if method == "gradcam" else GradCAMPlusPlus)(net, layer, runs_on=runs_on)
    pixels = [np.rint(net.fit_pixels(i.astype(np.float32))) for i in images]
    return cam(images, labels), np.stack([cam.low_resolution(p, labels) for p in pixels]), cam


@pytest.mark.parametrize("family,method", [("default", "gradcam"), ("default", "gradcam_plus_plus"),
                                           ("vit_tiny", "gradcam")])
def test_library_gradcam_runs_in_the_graph_and_equals_its_torch_path(family, method, default_net, chelsea, coffee):
    """``explainer.gradcam`` (and Grad-CAM++) take the in-graph path on a CNN and a ViT (class token,
    tokens on their grid), say so, and equal the torch path (forward and backward on the converted
    module, which pytorch-grad-cam checks: test_cams.py, test_compatibility.py) within 1e-4 of the
    map's range: at the feature grid and as public maps, two images and two labels in one call, with
    no converted module made for it."""
    net = default_net if family == "default" else _family(family, "legacy")
    images = [chelsea, coffee[:chelsea.shape[0], :chelsea.shape[1]]]  # one size: the maps stack
    choice = explainer.gradcam_engine(net, method=method)
    assert choice == "onnxruntime" and choice.describe() == "onnxruntime (differentiated head)"
    if family != "default":  # a fresh classifier: the in-graph path converts nothing
        assert not net.runtime.torch_engines
    fn = explainer.gradcam if method == "gradcam" else explainer.gradcam_plus_plus
    public = fn(net, images, [285, 3])
    ours, low, cam = _public_and_low(net, images, [285, 3], method)
    assert cam.runs_on == "onnxruntime" and np.array_equal(public, ours)
    if family != "default":
        assert not net.runtime.torch_engines
    theirs, torch_low, torch_cam = _public_and_low(net, images, [285, 3], method, runs_on="torch")
    assert torch_cam.runs_on == "torch"
    assert public.shape == theirs.shape == (2, 2, *chelsea.shape[:2])
    assert _relative_error(low, torch_low) <= TOLERANCE
    assert _relative_error(public, theirs) <= TOLERANCE


def test_int8_model_takes_the_in_graph_path():
    import exports

    net = explainer.load(exports.export("mobilenet_v3_small", "legacy", "int8-qdq"), device="cpu")
    layer = explainer.gradcam_layers(net).feature
    assert net.layer(layer).op_type == "DequantizeLinear"
    assert explainer.gradcam_engine(net).describe() == "onnxruntime (differentiated head)"


def test_unsupported_head_falls_back_to_torch_and_says_why(default_net, chelsea, coffee, monkeypatch):
    """A head op with no gradient rule (Selu): Grad-CAM runs on the converted module, and
    ``gradcam_engine`` names the op; decided once per classifier and layer (the branch is built once).
    A reduction layer other than the class scores runs on torch too, saying so; asking for onnxruntime
    where it cannot run is a typed error with the same reason."""
    from explainer.export import engine
    from explainer.methods.gradcam import GradCAM

    c, k = 6, 5
    net = _classifier([_n("Selu", ["feature"], ["s"]), _n("GlobalMaxPool", ["s"], ["p"]), _n("Flatten", ["p"], ["f"]),
                       _n("Gemm", ["f", "w"], ["scores"], transB=1)], [_const("w", _w(k, c))])
    built = []
    original = engine.build_explained
    monkeypatch.setattr(engine, "build_explained", lambda *a, **kw: built.append(a[2]) or original(*a, **kw))
    choice = explainer.gradcam_engine(net, "feature")
    assert choice == "torch" and choice.describe() == "torch (head op Selu has no gradient rule)"
    maps = explainer.gradcam(net, [chelsea, coffee], [1, 3], feature_layer="feature")
    assert GradCAM(net, "feature").runs_on.describe() == choice.describe()
    assert built == ["feature"]  # once, whatever asked
    expected = GradCAM(net, "feature", runs_on="torch")([chelsea, coffee], [1, 3])
    for a, b in zip(maps, expected):  # two sizes: a list of maps
        np.testing.assert_array_equal(a, b)
    with pytest.raises(InvalidParameterError, match="Selu has no gradient rule"):
        GradCAM(net, "feature", runs_on="onnxruntime")
    # another reduction: torch, whatever the head
    reduction = default_net.layer(default_net.gradient_scores).name
    other = next(layer.name for layer in reversed(default_net.layers()) if layer.name != reduction
                 and layer.shape is not None and len(layer.shape) == 1)
    choice = explainer.gradcam_engine(default_net, reduction_layer=other)
    assert choice == "torch" and other in choice.reason and "class scores" in choice.reason


def test_the_differentiated_heads_run_counts_its_own_memory(chelsea, coffee, monkeypatch):
    """The run budget counts the in-graph Grad-CAM run as the graph with the branch needs it, not as the
    classifier's forward: Grad-CAM's weighted feature map (N, K, C, H, W) and the feature map itself are
    alive at once in the branch, at least (K + 1) feature maps an image, where the forward's peak here
    is two (the Conv's output and its Relu; a fuzzed file's branch ran 384 MB where its forward counted
    96 MB). Counted per image and class; a budget for one image runs one image a call, with the bytes
    in flight never over it; more classes than the budget holds for one image is one typed error; a
    budget between the forward's need and one image's branch takes the torch path, saying why."""
    from explainer import limits
    from explainer.errors import ResourceLimitError
    from explainer.export import engine
    from explainer.runtime.budget import IN_FLIGHT

    c, k, size = 6, 5, 256
    head = ([_n("GlobalMaxPool", ["feature"], ["p"]), _n("Flatten", ["p"], ["f"]),
             _n("Gemm", ["f", "w"], ["scores"], transB=1)], [_const("w", _w(k, c))])
    feature = c * size * size * 4  # bytes of the feature map, one image
    net = _classifier(*head, size=size)
    forward = net.ort.guard.need((1, *net.per_image_shape))
    choice, _, cost = engine._entry(net, "gradcam", "feature")
    assert choice == "onnxruntime", choice.describe()
    assert forward < cost.bytes(1, 1) and all(cost.bytes(1, n) >= (n + 1) * feature for n in (1, 2, 5))
    assert cost.bytes(3, 2) == 3 * cost.bytes(1, 2)

    # a budget for one image (with one class), not two: one image a call, the bytes in flight within it
    monkeypatch.setattr(limits, "MAX_RUN_BYTES", cost.bytes(1, 1) + cost.bytes(1, 1) // 2)
    calls = []
    original = engine._held
    monkeypatch.setattr(engine, "_held", lambda *a: calls.append(a[2:]) or original(*a))
    IN_FLIGHT.peak = 0
    maps = explainer.gradcam(net, [chelsea, coffee], 1, feature_layer="feature")
    assert calls == [(1, 1), (1, 1)] and 0 < IN_FLIGHT.peak <= limits.MAX_RUN_BYTES
    expected = explainer.methods.gradcam.GradCAM(net, "feature", runs_on="torch")([chelsea, coffee], 1)
    for a, b in zip(maps, expected):
        assert float(np.abs(a - b).max()) <= 1e-4
    with pytest.raises(ResourceLimitError, match="fewer classes"):
        explainer.gradcam(net, chelsea, [0, 1, 2, 3, 4], feature_layer="feature")

    # a budget between the forward's need and one image's branch: the torch path, saying why
    monkeypatch.setattr(limits, "MAX_RUN_BYTES", (forward + cost.bytes(1, 1)) // 2)
    other = _classifier(*head, size=size)
    choice = explainer.gradcam_engine(other, "feature")
    assert choice == "torch" and "over the run budget" in choice.reason, choice.describe()


def _lite0_int8(tmp_path_factory, default_net):
    """The embedded EfficientNet-Lite0 quantised as the compatibility suite's int8 variants are
    (onnxruntime.quantization, static QDQ, per-channel int8 weights, uint8 activations)."""
    import exports

    folder = tmp_path_factory.mktemp("lite0_int8")
    (folder / "lite0.onnx").write_bytes(default_net.source_model.SerializeToString())
    exports._quantize(folder / "lite0.onnx", folder / "model.onnx", "int8-qdq")
    return folder / "model.onnx"


@pytest.mark.parametrize("family", ["mobilenet_v3_small", "efficientnet_lite0"])
def test_int8_qdq_library_gradcam_equals_the_exported_map(family, default_net, tmp_path, tmp_path_factory,
                                                          chelsea, coffee):
    """int8 QDQ graphs (MobileNetV3-Small's Hardswish head, Lite0's): the library's Grad-CAM now takes
    onnxruntime's int8 activations too, so it equals the exported model's saliency (1e-4 of the range,
    correlation >= 0.98) at the feature grid and at the image's size; from the converted module, whose
    int8 rounding differs, it was 2-4 % of the range apart."""
    import exports

    path = exports.export(family, "legacy", "int8-qdq") if family != "efficientnet_lite0" else \
        _lite0_int8(tmp_path_factory, default_net)
    net = explainer.load(str(path), device="cpu")
    assert explainer.gradcam_engine(net) == "onnxruntime"
    for map_size in ("feature", "input"):
        exported = explainer.export_explained(net, tmp_path / f"{map_size}.onnx", top_k=2, map_size=map_size)
        session = _session(exported)
        for image in (chelsea, coffee):
            pixels, x = _inputs(net, [image])
            saliency, classes = session.run(["saliency", "saliency_class"], {net.input.name: x})
            labels = [int(c) for c in classes[0]]
            if map_size == "feature":
                ours = _library_maps(net, pixels, classes, runs_on="auto")
            else:
                ours = explainer.gradcam(net, pixels[0].astype(np.uint8), labels)[None]
            assert _relative_error(ours, saliency) <= TOLERANCE, (map_size, labels)
            assert np.corrcoef(ours.ravel(), saliency.ravel())[0, 1] >= 0.98


def test_the_readme_deployment_example_runs_on_onnxruntime_alone(default_net, chelsea, tmp_path):
    """README's 10-line example, run as written in a fresh process next to an exported default model and a
    cat: it prints the class the library predicts and the map's shape."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Explanations that ship with the model"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    explainer.export_explained(default_net, tmp_path / "lite0_explained.onnx")
    Image.fromarray(chelsea).save(tmp_path / "cat.png")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    h, w = default_net.layout(explainer.gradcam_layers(default_net).feature).grid
    assert out.stdout.split("\n")[0] == f"{default_net.top_k(chelsea, 1)[0].label} (1, 1, {h}, {w})"


@pytest.mark.parametrize("variant", ["fp16", "mixed"])
def test_float16_models_keep_their_outputs_bit_identical(variant, tmp_path, chelsea, coffee):
    """A float16 model (and one with float32 input and output, float16 inside): onnxruntime's CPU provider
    runs it in float32 through Casts it inserts, and converts a weight read only by float16 nodes once at
    load; a head weight the branch read too kept a Cast at run time, the source's Gemm then multiplied by
    a computed tensor (not packed) and its scores moved by one float16 step. The branch has its own copy
    of such weights: the source's outputs are bit-identical, for every exportable method; the maps equal
    the library's within float16's precision (measured 4e-4 / 1.4e-4 of the range, fp16 / mixed)."""
    import exports

    net = explainer.load(exports.export("resnet18", "legacy", variant), device="cpu")
    assert check_export(net, tmp_path, [chelsea, coffee], "gradcam", top_k=2) <= 2e-3  # asserts bit-identity
    pixels, x = _inputs(net, [chelsea], 1)
    expected = _session(net.source_model).run(None, {net.input.name: x})
    for method in ("gradcam_plus_plus", "recipro_cam"):
        path = explainer.export_explained(net, tmp_path / f"{method}.onnx", method=method)
        got = _session(path).run(None, {net.input.name: x})
        assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(expected, got)), method


def test_recipro_cam_on_a_dynamo_convnext_exported_for_batch_1(tmp_path, chelsea, coffee):
    """The dynamo exporter writes ConvNeXt's head at batch 1 with ``as_strided`` as a flat Gather: the
    pooled map reshaped to [-1], then Gather(axis=0) with constant (1, 320, 1, 1) indices into the one
    image's elements. The masked copies ride on the batch axis, so copied as it is that Gather kept the
    first copy's elements only (and the checker refused the graph); the copy gathers each copy's own
    elements. The file is valid, its outputs are the source's bit for bit, and its maps equal the
    library's Recipro-CAM at the feature layer."""
    import exports
    from explainer.methods.recipro_cam import low_resolution

    net = explainer.load(exports.export("convnext_atto", "dynamo"), device="cpu")
    graph = net.source_model.graph
    flat = {n.output[0] for n in graph.node if n.op_type == "Reshape"}
    assert any(n.op_type == "Gather" and n.input[0] in flat for n in graph.node)  # the pattern is there
    path = explainer.export_explained(net, tmp_path / "recipro.onnx", method="recipro_cam", top_k=2)
    onnx.checker.check_model(str(path), full_check=True)
    session, source = _session(path), _session(net.source_model)
    layer = net.layer(explainer.gradcam_layers(net).feature)
    for image in (chelsea, coffee):
        small = net.fit_pixels(image)
        x = net.to_model_input(small[None])
        got = session.run(None, {net.input.name: x})
        assert all(np.array_equal(a, b) for a, b in zip(source.run(None, {net.input.name: x}), got))
        classes = [int(c) for c in got[-1][0]]
        expected = low_resolution(net, small, layer, classes)
        assert got[-2].shape == (1, 2, *expected.shape[1:])
        assert float(np.abs(got[-2][0] - expected).max()) <= 1e-5
