"""What the graph's wiring says of its tensors (explainer/model/structure.py), on tiny graphs built here
in the shapes other exporters write: attention spelled as MatMul → Mul → Softmax → MatMul with a layer
norm decomposed into ReduceMean/Sub/Pow/Sqrt/Div (torch's legacy exporter before opset 17, tf2onnx),
channels-last stretches of any width (Keras, Hugging Face ConvNeXt), and tensors the image never reaches
(masks built from shapes). Truth: onnxruntime's own outputs and the graph as written here."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import explainer
from explainer.errors import DegenerateMapError, LayerNotFeatureMapError

SIZE, PATCH, C = 16, 4, 8  # a 4 x 4 grid of 16 tokens of width 8
T = (SIZE // PATCH) ** 2


def _finish(nodes, inits, k=5, opset=15):
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                            ["N", 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", k])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _w(rng, *shape, scale=0.3):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def _decomposed_norm(nodes, inits, x, out, axis=-1):
    """LayerNorm over the last axis as the legacy exporter writes it before opset 17."""
    inits += [numpy_helper.from_array(np.array(2.0, np.float32), f"{out}_two"),
              numpy_helper.from_array(np.array(1e-5, np.float32), f"{out}_eps")]
    nodes += [helper.make_node("ReduceMean", [x], [f"{out}_mean"], axes=[axis], keepdims=1),
              helper.make_node("Sub", [x, f"{out}_mean"], [f"{out}_centred"]),
              helper.make_node("Pow", [f"{out}_centred", f"{out}_two"], [f"{out}_sq"]),
              helper.make_node("ReduceMean", [f"{out}_sq"], [f"{out}_var"], axes=[axis], keepdims=1),
              helper.make_node("Add", [f"{out}_var", f"{out}_eps"], [f"{out}_vareps"]),
              helper.make_node("Sqrt", [f"{out}_vareps"], [f"{out}_std"]),
              helper.make_node("Div", [f"{out}_centred", f"{out}_std"], [out], name=out)]


def _tf2onnx_norm(nodes, inits, x, out):
    """Keras's LayerNormalization as tf2onnx writes it: moments by GlobalAveragePool over (N, T, C)'s last
    axis, then x * inv + (-mean) * inv with inv = gamma / sqrt(var + eps)."""
    inits += [numpy_helper.from_array(np.array(1e-3, np.float32), f"{out}_eps"),
              numpy_helper.from_array(np.full(C, 1.1, np.float32), f"{out}_gamma")]
    nodes += [helper.make_node("GlobalAveragePool", [x], [f"{out}_mean"]),
              helper.make_node("Neg", [f"{out}_mean"], [f"{out}_neg"]),
              helper.make_node("Sub", [x, f"{out}_mean"], [f"{out}_diff"]),
              helper.make_node("Mul", [f"{out}_diff", f"{out}_diff"], [f"{out}_sq"]),
              helper.make_node("GlobalAveragePool", [f"{out}_sq"], [f"{out}_var"]),
              helper.make_node("Add", [f"{out}_var", f"{out}_eps"], [f"{out}_vareps"]),
              helper.make_node("Sqrt", [f"{out}_vareps"], [f"{out}_std"]),
              helper.make_node("Reciprocal", [f"{out}_std"], [f"{out}_rstd"]),
              helper.make_node("Mul", [f"{out}_rstd", f"{out}_gamma"], [f"{out}_inv"]),
              helper.make_node("Mul", [x, f"{out}_inv"], [f"{out}_scaled"]),
              helper.make_node("Mul", [f"{out}_neg", f"{out}_inv"], [f"{out}_shift"]),
              helper.make_node("Add", [f"{out}_scaled", f"{out}_shift"], [out], name=out)]


def attention_classifier(k=5, seed=0, class_token=False, norm=_decomposed_norm) -> onnx.ModelProto:
    """Patch conv → tokens (N, 16, 8) [after a class token] → decomposed norm → one self-attention →
    residual → token mean [the class token] → Gemm. Attention: MatMul(q, kᵀ) → Mul(scale) → Softmax →
    MatMul(·, v)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(_w(rng, C, 3, PATCH, PATCH, scale=0.01), "patch_w"),
             numpy_helper.from_array(np.array([0, C, T], np.int64), "to_tokens"),
             numpy_helper.from_array(_w(rng, C, C), "wq"), numpy_helper.from_array(_w(rng, C, C), "wk"),
             numpy_helper.from_array(_w(rng, C, C), "wv"),
             numpy_helper.from_array(np.array(C ** -0.5, np.float32), "scale"),
             numpy_helper.from_array(_w(rng, k, C, scale=1.0), "head_w"),
             numpy_helper.from_array(np.zeros(k, np.float32), "head_b")]
    nodes = [helper.make_node("Conv", ["image", "patch_w"], ["patches"], name="patch", strides=[PATCH, PATCH],
                              kernel_shape=[PATCH, PATCH]),
             helper.make_node("Reshape", ["patches", "to_tokens"], ["flat"], name="flat"),
             helper.make_node("Transpose", ["flat"], ["patch_tokens"], name="patch_tokens", perm=[0, 2, 1])]
    if class_token:  # ViT: a learnt token first, the score read from it
        inits += [numpy_helper.from_array(_w(rng, 1, 1, C), "cls"),
                  numpy_helper.from_array(np.array([1, 1], np.int64), "ones2"),
                  numpy_helper.from_array(np.array([0], np.int64), "zero")]
        nodes += [helper.make_node("Shape", ["image"], ["in_shape"], end=1),
                  helper.make_node("Concat", ["in_shape", "ones2"], ["cls_shape"], axis=0),
                  helper.make_node("Expand", ["cls", "cls_shape"], ["cls_batch"]),
                  helper.make_node("Concat", ["cls_batch", "patch_tokens"], ["tokens"], name="tokens", axis=1)]
    else:
        nodes.append(helper.make_node("Identity", ["patch_tokens"], ["tokens"], name="tokens"))
    norm(nodes, inits, "tokens", "norm1")
    nodes += [helper.make_node("MatMul", ["norm1", "wq"], ["q"], name="q"),
              helper.make_node("MatMul", ["norm1", "wk"], ["k"], name="k"),
              helper.make_node("MatMul", ["norm1", "wv"], ["v"], name="v"),
              helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
              helper.make_node("MatMul", ["q", "kt"], ["scores"], name="scores"),
              helper.make_node("Mul", ["scores", "scale"], ["scaled"], name="scaled"),
              helper.make_node("Softmax", ["scaled"], ["attn"], name="attn", axis=-1),
              helper.make_node("MatMul", ["attn", "v"], ["mixed"], name="mixed"),
              helper.make_node("Add", ["tokens", "mixed"], ["residual"], name="residual"),
              helper.make_node("Gather", ["residual", "zero"], ["pooled_1"], name="pool", axis=1)
              if class_token else
              helper.make_node("ReduceMean", ["residual"], ["pooled_1"], name="pool", axes=[1], keepdims=1),
              helper.make_node("Flatten", ["pooled_1"], ["pooled"], name="flatten"),
              helper.make_node("Gemm", ["pooled", "head_w", "head_b"], ["logits"], name="head", transB=1)]
    return _finish(nodes, inits, k)


def channels_last_classifier(k=5, seed=0) -> onnx.ModelProto:
    """ConvNeXt's block as Hugging Face exports it: conv → NHWC → LayerNorm(C=8) → MatMul to 4C=32 →
    Gelu (H, W, 32): a channels-last grid whose width no norm normalises → MatMul back → NCHW → GAP."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(_w(rng, C, 3, PATCH, PATCH, scale=0.01), "patch_w"),
             numpy_helper.from_array(np.ones(C, np.float32), "ln_scale"),
             numpy_helper.from_array(np.zeros(C, np.float32), "ln_bias"),
             numpy_helper.from_array(_w(rng, C, 4 * C), "up"), numpy_helper.from_array(_w(rng, 4 * C, C), "down"),
             numpy_helper.from_array(_w(rng, k, C, scale=1.0), "head_w"),
             numpy_helper.from_array(np.zeros(k, np.float32), "head_b")]
    nodes = [helper.make_node("Conv", ["image", "patch_w"], ["patches"], name="patch", strides=[PATCH, PATCH],
                              kernel_shape=[PATCH, PATCH]),
             helper.make_node("Transpose", ["patches"], ["nhwc"], name="nhwc", perm=[0, 2, 3, 1]),
             helper.make_node("LayerNormalization", ["nhwc", "ln_scale", "ln_bias"], ["normed"], name="norm", axis=-1),
             helper.make_node("MatMul", ["normed", "up"], ["wide"], name="up"),
             helper.make_node("Gelu", ["wide"], ["gelu"], name="gelu"),
             helper.make_node("MatMul", ["gelu", "down"], ["narrow"], name="down"),
             helper.make_node("Transpose", ["narrow"], ["nchw"], name="nchw", perm=[0, 3, 1, 2]),
             helper.make_node("GlobalAveragePool", ["nchw"], ["gap"], name="gap"),
             helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "head_w", "head_b"], ["logits"], name="head", transB=1)]
    return _finish(nodes, inits, k, opset=20)


def _patch_conv(k, seed):
    """(nodes, initializers) of a 4x4 patch Conv to C channels ("patches"), and a head's weights."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(_w(rng, C, 3, PATCH, PATCH, scale=0.01), "patch_w"),
             numpy_helper.from_array(_w(rng, k, C, scale=1.0), "head_w"),
             numpy_helper.from_array(np.zeros(k, np.float32), "head_b")]
    return [helper.make_node("Conv", ["image", "patch_w"], ["patches"], name="patch", strides=[PATCH, PATCH],
                             kernel_shape=[PATCH, PATCH])], inits


def _pooled_head(nodes, inits, k):
    """relu → GlobalAveragePool → Flatten → Gemm: the finished model."""
    nodes += [helper.make_node("GlobalAveragePool", ["relu"], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
              helper.make_node("Gemm", ["flat", "head_w", "head_b"], ["logits"], name="head", transB=1)]
    return _finish(nodes, inits, k)


def image_independent_classifier(k=5, seed=0) -> onnx.ModelProto:
    """A position table built from the input's shape only (ConstantOfShape(Shape(x))), added to the
    feature map, as a dynamo Swin export builds its shifted-window mask."""
    nodes, inits = _patch_conv(k, seed)
    nodes += [helper.make_node("Shape", ["patches"], ["shape"], name="shape"),
              helper.make_node("ConstantOfShape", ["shape"], ["table"], name="table",
                               value=numpy_helper.from_array(np.array([0.5], np.float32))),
              helper.make_node("Exp", ["table"], ["mask"], name="mask"),
              helper.make_node("Add", ["patches", "mask"], ["placed"], name="placed"),
              helper.make_node("Relu", ["placed"], ["relu"], name="relu")]
    return _pooled_head(nodes, inits, k)


def cancelling_classifier(k=5, seed=0) -> onnx.ModelProto:
    """conv → conv − its spatial mean → Relu → GAP → Gemm: the score's gradient with respect to the first
    conv sums to zero over each channel's map, so Grad-CAM's averaged weights there are rounding noise."""
    nodes, inits = _patch_conv(k, seed)
    nodes += [helper.make_node("ReduceMean", ["patches"], ["mean"], name="mean", axes=[2, 3], keepdims=1),
              helper.make_node("Sub", ["patches", "mean"], ["centred"], name="centred"),
              helper.make_node("Relu", ["centred"], ["relu"], name="relu")]
    return _pooled_head(nodes, inits, k)


def _image(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def _ort_output(model, tensor, pixels):
    """The tensor as onnxruntime computes it on the library's own model input."""
    extra = onnx.ModelProto()
    extra.CopyFrom(model)
    extra.graph.output.append(helper.make_empty_tensor_value_info(tensor))
    session = ort.InferenceSession(extra.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([tensor], {"image": pixels})[0]


@pytest.mark.parametrize("class_token, norm", [(False, _decomposed_norm), (True, _decomposed_norm),
                                               (True, _tf2onnx_norm)])
def test_attention_found_from_the_wiring_and_never_a_default_layer(class_token, norm):
    net = explainer.load(attention_classifier(class_token=class_token, norm=norm), preprocessing="unit")
    structure = net.structure
    assert {"scores", "scaled", "attn"} <= structure.attention
    assert not {"q", "kt", "v", "mixed", "residual", "norm1", "tokens"} & structure.attention
    assert net.token_channels == {C}  # from the decomposed norm: there is no LayerNormalization node
    choice = explainer.gradcam_layers(net)
    # a class token: the norm before the last attention (pytorch-grad-cam's ViT recipe); else the last
    # token grid (Swin, LeViT)
    assert choice.feature == ("norm1" if class_token else "residual"), choice.reason
    layout = net.layout(choice.feature)
    assert (layout.kind, layout.grid, layout.channels, layout.prefix) == ("tokens", (4, 4), C, int(class_token))
    img = _image()
    top = net.top_k(img, 1)[0].index
    cam = explainer.gradcam(net, img, top)
    assert cam.shape == (SIZE, SIZE) and np.all(np.isfinite(cam)) and cam.max() > 0
    for name in ("scores", "scaled", "attn"):
        for call in (lambda: explainer.gradcam(net, img, 0, feature_layer=name),
                     lambda: net.activations(img, name),
                     lambda: explainer.deep_dream_image(net, name, 0, num_iterations=1, verbose=False)):
            with pytest.raises(LayerNotFeatureMapError, match="attention"):
                call()


def test_softmax_of_the_classifier_is_not_attention():
    """The head's Softmax reads a product with constant weights: not attention."""
    from graphs import linear_classifier

    model, _ = linear_classifier(softmax=True)
    net = explainer.load(model, preprocessing="unit")
    assert not net.structure.attention


def test_channels_last_grid_of_any_width_is_read_as_chw():
    """The Gelu's (4, 4, 32) grid is 4C wide, a width no norm normalises: activations, Grad-CAM and deep
    dream read it as (32, 4, 4), equal to onnxruntime's tensor transposed."""
    model = channels_last_classifier()
    net = explainer.load(model, preprocessing="unit")
    layout = net.layout("gelu")
    assert (layout.kind, layout.channels, layout.grid) == ("HWC", 4 * C, (4, 4))
    img = _image()
    acts = net.activations(img, "gelu")
    pixels = net.to_model_input(net.prepare([img])[0])
    expected = _ort_output(net.model, "gelu", pixels)[0].transpose(2, 0, 1)
    np.testing.assert_allclose(acts, expected, rtol=1e-6, atol=1e-6)
    cam = explainer.gradcam(net, img, 0, feature_layer="gelu")
    assert cam.shape == (SIZE, SIZE) and np.ptp(cam) > 0
    dream = explainer.deep_dream_image(net, "gelu", [0, 31], num_iterations=2, pyramid_levels=1,
                                       verbose=False, random_state=0)
    assert dream.shape == (2, SIZE, SIZE, 3) and np.all(np.isfinite(dream))


def test_nhwc_feature_map_of_a_cnn_is_not_misread():
    """Without any norm (a Keras CNN through tf2onnx keeps NHWC between convolutions), an (H, W, C)
    tensor whose (H, W) is the image's grid is channels-last, not C=H channels of H x C."""
    from explainer.model.layouts import feature_layout

    assert feature_layout((8, 8, 32), (16, 16), None).kind == "HWC"
    assert feature_layout((32, 8, 8), (16, 16), None).kind == "CHW"
    assert feature_layout((32, 9, 9), (16, 16), None).kind == "CHW"  # a map padded before a conv


def test_layer_the_image_does_not_reach_is_refused_by_name():
    net = explainer.load(image_independent_classifier(), preprocessing="unit")
    assert "mask" not in net.structure.image_dependent and "placed" in net.structure.image_dependent
    img = _image()
    for call in (lambda: net.activations(img, "mask"),
                 lambda: explainer.gradcam(net, img, 0, feature_layer="mask"),
                 lambda: explainer.deep_dream_image(net, "mask", 0, num_iterations=1, verbose=False)):
        with pytest.raises(LayerNotFeatureMapError, match="'mask'.*does not depend on the image"):
            call()
    assert explainer.gradcam_layers(net).feature != "mask"


def test_gradcam_at_noise_level_is_an_error_naming_the_layer():
    """At the first conv the averaged gradient cancels exactly: the map would be rounding noise."""
    net = explainer.load(cancelling_classifier(), preprocessing="unit")
    img = _image()
    with pytest.raises(DegenerateMapError, match="'patch'.*(noise level|zero everywhere)"):
        explainer.gradcam(net, img, 0, feature_layer="patch")
    # after the subtraction the gradient no longer cancels: a real map
    cam = explainer.gradcam(net, img, 0, feature_layer="relu")
    assert np.ptp(cam) > 0
