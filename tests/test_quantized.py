"""Quantized graphs (onnxruntime.quantization: static QDQ and dynamic ConvInteger/MatMulInteger) convert
to modules whose forward is onnxruntime's integer arithmetic and whose backward is the
straight-through estimator; gradient methods then explain the int8 model that ships.

Single-node graphs are checked against onnxruntime exactly; real int8 copies of compatibility-suite
exports (quantized by onnxruntime.quantization, calibrated on photographs) against onnxruntime and
against the float model they came from."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import explainer
from explainer.errors import BatchFallbackWarning, ConversionError
from explainer.methods.gradcam import GradCAM
from explainer.runtime.torch_engine import torch_engine

import exports
import references

RNG = np.random.default_rng(0)


def _convert_one(node, inputs: dict, initializers: dict, output_type=TensorProto.FLOAT):
    """onnxruntime's outputs and onnx2torch's module (with our converters) for a one-node graph."""
    import onnx2torch

    from explainer.convert import converters  # noqa: F401

    graph = helper.make_graph(
        [node], "one",
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for k, v in inputs.items()],
        [helper.make_tensor_value_info(o, output_type, None) for o in node.output],
        [numpy_helper.from_array(v, k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, inputs)
    return expected, onnx2torch.convert(model)


def _torch(module, inputs: dict):
    with torch.no_grad():
        out = module(*[torch.from_numpy(v.astype(np.float32)) for v in inputs.values()])
    return [o.numpy() for o in (out if isinstance(out, (tuple, list)) else [out])]


@pytest.mark.parametrize("dtype,axis", [(np.uint8, None), (np.int8, None), (np.int8, 1), (np.uint8, 1)])
def test_quantize_dequantize_linear_equal_onnxruntime(dtype, axis):
    # ties (x/scale = k + 0.5) round to even, values beyond the range saturate
    scale = np.array([0.5, 0.25, 0.1], np.float32) if axis is not None else np.array(0.5, np.float32)
    zero = (np.array([3, 0, 7], dtype) if axis is not None else np.array(3, dtype))
    x = np.concatenate([RNG.uniform(-80, 80, (2, 3, 4, 4)), np.full((1, 3, 4, 4), 0.75),
                        np.full((1, 3, 4, 4), -200.0)]).astype(np.float32)
    kwargs = {} if axis is None else {"axis": axis}
    q = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **kwargs)
    expected, module = _convert_one(q, {"x": x}, {"s": scale, "z": zero}, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
    np.testing.assert_array_equal(_torch(module, {"x": x})[0], expected[0].astype(np.float32))
    d = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **kwargs)
    integers = expected[0]
    expected, module = _convert_one(d, {"q": integers}, {"s": scale, "z": zero})
    np.testing.assert_array_equal(_torch(module, {"q": integers})[0], expected[0])


def test_dynamic_quantize_linear_equals_onnxruntime():
    for x in (RNG.normal(0, 3, (2, 5, 7)), RNG.uniform(0.5, 2.0, (3, 4)), -RNG.uniform(0.5, 2.0, (3, 4))):
        x = x.astype(np.float32)
        node = helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"])
        graph = helper.make_graph([node], "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.UINT8, None),
                                   helper.make_tensor_value_info("s", TensorProto.FLOAT, None),
                                   helper.make_tensor_value_info("z", TensorProto.UINT8, None)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
        from explainer.convert.converters.quantization import DynamicQuantizeLinear

        got = [t.numpy() for t in DynamicQuantizeLinear()(torch.from_numpy(x))]
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_allclose(got[1], expected[1], rtol=1e-7)
        np.testing.assert_array_equal(got[2], expected[2])


@pytest.mark.parametrize("group,pads", [(1, [1, 1, 1, 1]), (4, [1, 1, 1, 1]), (4, [0, 1, 2, 1]), (2, [0, 0, 0, 0])])
def test_conv_integer_equals_onnxruntime(group, pads):
    x = RNG.integers(0, 256, (2, 4, 9, 9)).astype(np.uint8)
    w = RNG.integers(-128, 128, (8, 4 // group, 3, 3)).astype(np.int8)
    w_zero = np.array(-2, np.int8)  # onnxruntime has per-tensor weight zero points only
    node = helper.make_node("ConvInteger", ["x", "w", "xz", "wz"], ["y"], group=group, pads=pads, strides=[2, 1])
    expected, module = _convert_one(node, {"x": x}, {"w": w, "xz": np.array(7, np.uint8), "wz": w_zero},
                                    TensorProto.INT32)
    np.testing.assert_array_equal(_torch(module, {"x": x})[0], expected[0])


def test_matmul_integer_equals_onnxruntime():
    a = RNG.integers(0, 256, (2, 5, 16)).astype(np.uint8)
    b = RNG.integers(-128, 128, (16, 6)).astype(np.int8)
    node = helper.make_node("MatMulInteger", ["a", "b", "az", "bz"], ["y"])
    expected, module = _convert_one(node, {"a": a}, {"b": b, "az": np.array(9, np.uint8),
                                                     "bz": RNG.integers(-3, 4, 6).astype(np.int8)}, TensorProto.INT32)
    np.testing.assert_array_equal(_torch(module, {"a": a})[0], expected[0])


def test_straight_through_gradient_is_one_inside_the_range_and_zero_outside():
    from explainer.convert.converters.quantization import DequantizeLinear, QuantizeLinear

    scale, zero = torch.tensor(0.5), torch.tensor(10.0)
    x = torch.tensor([-6.0, -4.9, 0.3, 10.0, 122.0, 123.0], requires_grad=True)  # uint8: -5 .. 122.5
    y = DequantizeLinear(1)(QuantizeLinear(1, 0, 255)(x, scale, zero), scale, zero)
    y.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [0, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(y.detach().numpy(), [-5, -5, 0.5, 10, 122, 122.5])


@pytest.fixture(scope="module")
def parent():
    return explainer.load(exports.export("resnet18", "legacy"))


@pytest.fixture(scope="module")
def photo():
    from sklearn.datasets import load_sample_images

    return load_sample_images().images[1]  # not among the calibration photographs


@pytest.mark.parametrize("variant", ["int8-qdq", "int8-dynamic"])
def test_int8_resnet_explains_like_its_float_parent(parent, photo, variant, recwarn):
    net = explainer.load(exports.export("resnet18", "legacy", variant))
    engine = torch_engine(net)
    # within onnxruntime's own spread for this graph (fused kernels vs node by node, inputs 1e-6 apart)
    assert engine.max_relative_error <= engine.allowed_relative_error < 0.05
    if variant == "int8-qdq":
        assert net.max_batch is None  # fixed scales: the batch is freed
        layer = net.layer(explainer.gradcam_layers(net).feature)
        assert layer.op_type == "DequantizeLinear", layer  # through the Q/DQ pair, not the uint8 tensor
        assert net.gradient_scores != net.output.name  # the scores before their rounding
    else:  # one scale over the whole batch: an image's scores depend on the others
        assert net.max_batch == 1
        assert any("DynamicQuantizeLinear" in str(w.message) for w in recwarn.list
                   if issubclass(w.category, BatchFallbackWarning))
    label = parent.top_k(photo, 1)[0].index
    assert net.top_k(photo, 1)[0].index == label
    # the int8 module's own Grad-CAM and gradient, against pytorch-grad-cam and Captum on that module,
    # unscaled at the feature layer and as the public maps
    from captum.attr import Saliency
    from pytorch_grad_cam import GradCAM as ReferenceGradCAM

    # (the module's Grad-CAM: explainer.gradcam itself runs on onnxruntime's int8 kernels, through the
    # differentiated head, and equals the exported graph's map: test_export.py)
    cam = GradCAM(net, runs_on="torch")
    module, _ = engine.module_for(cam.feature_layer)
    x = torch.from_numpy(photo.astype(np.float32)).permute(2, 0, 1)[None]
    ref = references.raw_cam(ReferenceGradCAM, engine.pixel_model, module, x, label)
    references.assert_close_in_units(cam.low_resolution(photo, [label])[0], ref, 1e-5, "int8 Grad-CAM")
    ours = cam(photo, label)
    references.assert_close_in_units(ours, np.maximum(references.bicubic_upsample(ref, photo.shape[:2]), 0), 1e-5,
                                     "int8 Grad-CAM at the image's size")
    saliency = explainer.gradient_attribution(net, photo, label, verbose=False)
    gradient = Saliency(engine.pixel_model).attribute(x, target=label, abs=False).detach().numpy()[0]
    references.assert_close_in_units(saliency, references.rescale(np.abs(gradient).sum(axis=0)), 1e-4,
                                     "int8 gradient map")
    # and, looser, the float model it came from (its maps are the int8 model's own, not the parent's)
    theirs = explainer.gradcam(parent, photo, label)
    assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.95  # measured 0.994-0.995


def test_a_wrong_quantized_conversion_is_refused(monkeypatch):
    """The tolerance for quantized graphs is not a blanket pass: a converter that forgets the zero
    point (off by up to 255 steps) is caught."""
    from explainer.convert.converters import quantization

    forward = quantization.QuantizeLinear.forward
    monkeypatch.setattr(quantization.QuantizeLinear, "forward", lambda self, x, s, z=None: forward(self, x, s))
    net = explainer.load(exports.export("resnet18", "legacy", "int8-qdq"))
    with pytest.raises(ConversionError, match="differs from onnxruntime"):
        torch_engine(net)


@pytest.mark.slow
@pytest.mark.parametrize("exporter,variant", [("legacy", "int8-dynamic"), ("dynamo", "int8-qdq")])
def test_int8_vit(exporter, variant, photo):
    parent = explainer.load(exports.export("vit_tiny", exporter))
    net = explainer.load(exports.export("vit_tiny", exporter, variant))
    engine = torch_engine(net)
    assert engine.max_relative_error <= engine.allowed_relative_error
    # the class token behind a DequantizeLinear is expanded to the batch too
    assert net.max_batch == (1 if variant == "int8-dynamic" else None)
    assert explainer.gradcam_layers(net).feature == explainer.gradcam_layers(parent).feature  # the norm1 of the last block
    label = parent.top_k(photo, 1)[0].index
    # the int8 module's Grad-CAM against pytorch-grad-cam on that module (its ViT reshape_transform)
    from pytorch_grad_cam import GradCAM as ReferenceGradCAM

    cam = GradCAM(net, runs_on="torch")  # the module's (explainer.gradcam runs on onnxruntime's int8 kernels)
    layout = net.layout(cam.feature_layer)
    assert layout.kind == "tokens" and layout.prefix == 1, layout
    module, _ = engine.module_for(cam.feature_layer)
    x = torch.from_numpy(photo.astype(np.float32)).permute(2, 0, 1)[None]
    ref = references.raw_cam(ReferenceGradCAM, engine.pixel_model, module, x, label,
                             reshape_transform=references.vit_reshape(layout.prefix, layout.grid))
    references.assert_close_in_units(cam.low_resolution(photo, [label])[0], ref, 1e-5, "int8 ViT Grad-CAM")
    ours = cam(photo, label)
    references.assert_close_in_units(ours, np.maximum(references.bicubic_upsample(ref, photo.shape[:2]), 0), 1e-5,
                                     "int8 ViT Grad-CAM at the image's size")
    # and, looser, the float model it came from
    theirs = explainer.gradcam(parent, photo, label)
    assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.9  # measured 0.99-1.0
