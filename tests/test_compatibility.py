"""The compatibility suite: real torchvision and timm exports (both exporters, static and dynamic batch,
production wrappers, fp16, onnxslim) load, batch, convert and run every public method; scores equal
the torch model they were exported from. docs/compatibility.md is the same matrix as a table."""
import numpy as np
import pytest
import torch

import explainer
from explainer.errors import BatchFallbackWarning, ConversionError, LayerNotFeatureMapError

from compat import METHODS, cases, check
import exports

FAST = {("resnet18", "dynamo", "plain"), ("vit_tiny", "legacy", "plain")}


def main_suite(all_cases) -> set:
    """The cases the main suite runs: every family, every exporter setting and every variant at least
    once; the rest of the matrix (the same family by the other exporter, the same variant on another
    family) is marked ``matrix`` and ``.ci/run`` runs it after the main suite. Each family by one of
    the two exporters (FAST's where it has one, else the families alternate), each dynamic-batch,
    opset-14 and production/fp16/mixed/slim case on every other family (alternating between the kinds,
    so CNNs and transformers both get each)."""
    groups: dict = {}
    for family, exporter, variant in all_cases:
        kind = (exporter in ("legacy", "dynamo") and variant == "plain", exporter if variant == "plain" and
                exporter not in ("legacy", "dynamo") else None, variant)
        groups.setdefault(kind, {}).setdefault(family, []).append((family, exporter, variant))
    chosen = set(FAST)
    for turn, families in enumerate(groups.values()):
        for i, per in enumerate(families.values()):
            if any(case in FAST for case in per):
                continue
            if len(per) > 1:  # a family by {legacy, dynamo}: one exporter, the families alternating
                chosen.add(per[i % len(per)])
            elif (i + turn) % 2 == 0:  # a setting or variant: every other family, the groups alternating
                chosen.add(per[0])
    return chosen


MAIN = main_suite(cases())


def _marks(case):
    return () if case in FAST else (pytest.mark.slow,) if case in MAIN else (pytest.mark.slow, pytest.mark.matrix)


def test_main_suite_covers_every_family_setting_and_variant():
    """The split loses nothing from the main suite's view: every family, exporter setting and variant
    of the matrix is in it at least once, both exporters are, and the matrix part is the rest."""
    every = cases()
    assert {c[0] for c in MAIN} == {c[0] for c in every}
    assert {c[1] for c in MAIN} == {c[1] for c in every}
    assert {c[2] for c in MAIN} == {c[2] for c in every}
    assert FAST <= MAIN <= set(every) and len(MAIN) < len(every)


@pytest.mark.parametrize("case", [pytest.param(c, marks=_marks(c), id="-".join(c)) for c in cases()])
def test_every_method_on_real_exports(case):
    result = check(*case)
    failed = {m: r for m, r in result.items() if r != "ok"}
    assert not failed and set(result) == set(METHODS), failed


@pytest.mark.published
@pytest.mark.parametrize("case", [pytest.param(c, id="-".join(c)) for c in cases(published=True)])
def test_every_method_at_published_size(case):
    """Swin-T (torchvision and timm), CaiT-XXS24 with all its blocks, LeViT-128S, EfficientViT-B0 and
    PoolFormerV2-S12 as published, by both exporters and at opset 14: shrinking hid failures before."""
    result = check(*case)
    failed = {m: r for m, r in result.items() if r != "ok"}
    assert not failed and set(result) == set(METHODS), failed


# family -> where pytorch-grad-cam's tutorials put the target layer, as our layouts see it
TRANSFORMER_TARGETS = {"vit_tiny": ("norm", 1), "deit_tiny_distilled": ("norm", 2), "cait_xxs24": ("norm", 1),
                       "swin_timm": ("grid", 0), "swin_tv": ("grid", 0)}


@pytest.mark.parametrize("family", [pytest.param(f, marks=() if f == "vit_tiny" else pytest.mark.slow)
                                    for f in TRANSFORMER_TARGETS])
def test_default_gradcam_layer_is_never_attention_whatever_the_exporter(family, chelsea):
    """The legacy exporter at opset 14 writes LayerNormalization as ReduceMean/Sub/Pow/Sqrt/Div, where
    the attention scores (heads, T, T) once passed for a (C, H, W) map and Grad-CAM returned noise
    (peak 1.8e-14). Every export of one model picks the same place — the norm before the last attention
    for class-token models, the last token grid for Swin — never attention, and the three give the same
    map (the same weights)."""
    from explainer.methods.gradcam import GradCAM

    kind, prefix = TRANSFORMER_TARGETS[family]
    maps = {}
    for exporter in ("legacy", "legacy-old", "dynamo"):
        net = explainer.load(exports.export(family, exporter))
        cam = GradCAM(net)
        layer = net.layer(cam.feature_layer)
        assert net.structure.attention, (family, exporter, "no attention found")
        assert layer.output not in net.structure.attention and layer.op_type not in ("Softmax", "MatMul"), \
            (family, exporter, cam.feature_layer.reason if hasattr(cam.feature_layer, "reason") else cam.feature_layer)
        assert cam.layout.prefix == prefix and cam.layout.grid == (7, 7) if family.startswith("swin") else \
            cam.layout.grid == (14, 14), (family, exporter, cam.layout)
        if kind == "norm":
            assert layer.output in net.structure.norms, (family, exporter, layer)
        maps[exporter] = cam.low_resolution(net.fit_pixels(chelsea.astype(np.float32)), [285])[0]
        assert maps[exporter].max() > 0
    for exporter in ("legacy-old", "dynamo"):
        np.testing.assert_allclose(maps[exporter], maps["legacy"], rtol=1e-3, atol=1e-4 * maps["legacy"].max())


def _against_references(family, exporter, chelsea):
    """Our default Grad-CAM layer's raw map (feature resolution, unnormalised) on ``family``'s export,
    for the compatibility check's pixels and labels (compat.py: chelsea at the network's size, integer
    pixels, its top 2 classes), against pytorch-grad-cam's raw map (source_references.raw_grad_cam: its own
    ActivationsAndGradients and get_cam_image, no min-max scaling) (1) on the source torch model at
    source_references.TARGETS' module, the layer its README documents, with its tutorial's reshape transform,
    and (2) on our converted module at the node of our default layer, with the same transform. Returns
    the GradCAM object for the callers' layer assertions."""
    import source_references
    from compat import TOL

    from explainer.methods.gradcam import GradCAM

    net = explainer.load(exports.export(family, exporter))
    cam = GradCAM(net)
    pixels = np.rint(net.fit_pixels(chelsea.astype(np.float32))).astype(np.uint8)
    top = [p.index for p in net.top_k(pixels, 2)]
    ours = cam.low_resolution(pixels, top)
    source = source_references.references(family, pixels.astype(np.float32), top)["cam"]
    assert ours.shape == source.shape and source.max() > 0, (ours.shape, source.shape)
    error = np.abs(ours - source).max() / source.max()
    assert error <= TOL, f"{family}: Grad-CAM differs from pytorch-grad-cam's on the source model by {error:.2e}"
    module, _ = cam.engine.module_for(cam.feature_layer)
    kind = {"CHW": "chw", "HWC": "nhwc", "tokens": "tokens"}[cam.layout.kind]  # pytorch-grad-cam's transform
    transform = source_references.reshape_transform(source_references.Target("", kind, cam.layout.prefix))
    x = torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1)[None].repeat(len(top), 1, 1, 1)
    converted = source_references.raw_grad_cam(cam.engine.pixel_model, module, x, top, transform)
    error = np.abs(ours - converted).max() / converted.max()
    assert error <= 1e-5, f"{family}: Grad-CAM differs from pytorch-grad-cam's on our module by {error:.2e}"
    return cam


VIT_LIKE = [pytest.param("vit_tiny", 1, "/blocks/blocks.11/norm1/LayerNormalization", id="vit_tiny"),
            pytest.param("deit_tiny_distilled", 2, "/blocks/blocks.11/norm1/LayerNormalization", id="deit"),
            pytest.param("cait_xxs24", 1, "/blocks_token_only.1/norm1/LayerNormalization", id="cait_xxs24",
                         marks=pytest.mark.slow),
            pytest.param("cait_xxs24_full", 1, "/blocks_token_only.1/norm1/LayerNormalization",
                         id="cait_xxs24_full", marks=pytest.mark.published)]


@pytest.mark.parametrize("family,prefix,layer", VIT_LIKE)
def test_vit_gradcam_equals_pytorch_grad_cam_with_reshape_transform(family, prefix, layer, chelsea):
    """pytorch-grad-cam's ViT tutorial: target blocks[-1].norm1 (CaiT: the last class-attention
    block's norm1), drop the class token(s), reshape the 14x14 tokens to (C, H, W); our default layer
    and layout give the same raw map, CaiT also at its published 24 blocks."""
    cam = _against_references(family, "legacy", chelsea)
    assert cam.feature_layer == layer
    assert (cam.layout.kind, cam.layout.grid, cam.layout.prefix) == ("tokens", (14, 14), prefix)


SWINS = [pytest.param("swin_timm", "dynamo", id="swin_timm"),
         pytest.param("swin_tv", "dynamo", id="swin_tv", marks=pytest.mark.slow),
         pytest.param("swin_tiny", "dynamo", id="swin_tiny-published", marks=pytest.mark.published),
         pytest.param("swin_t", "dynamo", id="swin_t-published", marks=pytest.mark.published)]


@pytest.mark.parametrize("family,exporter", SWINS)
def test_swin_gradcam_equals_pytorch_grad_cam(family, exporter, chelsea):
    """Swin (timm and torchvision, shrunk and at their published size): the default layer is the last
    stage's 7 x 7 grid after the final norm, the tensor the pool reads (channels last, or channels
    first after torchvision's permute); pytorch-grad-cam with its Swin tutorial's transform (channels
    last to channels first) at that norm gives the same raw map."""
    cam = _against_references(family, exporter, chelsea)
    assert cam.layout.kind in ("HWC", "CHW") and cam.layout.grid == (7, 7), cam.layout


def test_default_gradcam_layers_by_architecture():
    """The last map before the head, whatever the activation: MobileNetV3's last 7x7 Hardswish, not an
    early ReLU; EfficientNet's SiLU (Mul); ConvNeXt's last stage."""
    expected = {"mobilenet_v3_small": ("HardSwish", (576, 7, 7)), "efficientnet_b0": ("Mul", (1280, 7, 7))}
    for family, (op, shape) in expected.items():
        net = explainer.load(exports.export(family, "legacy"))
        choice = explainer.gradcam_layers(net)
        layer = net.layer(choice.feature)
        assert (layer.op_type, layer.shape) == (op, shape), (family, layer, choice.reason)
        assert "spatial extent" in choice.reason


def test_class_attention_default_layer():
    """CaiT reads its class token through class-attention blocks (attention 1 x T): the default is the
    norm before the last of them, where patch tokens still reach the score."""
    net = explainer.load(exports.export("cait_xxs24", "legacy"))
    assert explainer.gradcam_layers(net).feature == "/blocks_token_only.1/norm1/LayerNormalization"


def test_attention_probabilities_are_refused(chelsea):
    net = explainer.load(exports.export("vit_tiny", "legacy"))
    attention = [l for l in net.layers() if l.op_type == "Softmax"][-1]
    assert attention.shape == (3, 197, 197)
    for call in (lambda: explainer.gradcam(net, chelsea, 0, feature_layer=attention.name),
                 lambda: net.activations(chelsea, attention.name),
                 lambda: explainer.deep_dream_image(net, attention.name, 0, num_iterations=1, verbose=False)):
        with pytest.raises(LayerNotFeatureMapError, match="attention"):
            call()


def test_batch_one_fallback_warns_and_explains_the_same(monkeypatch, chelsea):
    """A graph the batch passes cannot free runs one image at a time, with one warning, and gives the
    maps the freed graph gives."""
    from explainer.convert import batch

    path = exports.export("vit_tiny", "legacy")
    freed = explainer.load(path)
    images = [chelsea, chelsea[:200]]

    def explain(net):
        return (net.predict(images), explainer.gradcam(net, chelsea, [0, 5]),
                explainer.occlusion_sensitivity(net, chelsea, 0, mask_size=112, stride=56, verbose=False))

    expected = explain(freed)
    monkeypatch.setattr(batch, "_output_axis", lambda *args: None)  # the pass sees nothing to free
    with pytest.warns(BatchFallbackWarning, match="one image at a time"):
        fixed = explainer.load(path)
    assert fixed.max_batch == 1 and fixed.batch_size == 1 and freed.max_batch is None
    for got, want in zip(explain(fixed), expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_raw_conversion_errors_become_conversion_errors(monkeypatch, chelsea):
    """An op without a converter, or a module failing at run time, is one ConversionError naming the
    node and its op, never a raw torch or onnx2torch exception."""
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY

    net = explainer.load(exports.export("resnet18", "dynamo"))
    for key in [k for k in _CONVERTER_REGISTRY if k.operation_type == "Gemm"]:  # onnx2torch falls back to older ones
        monkeypatch.delitem(_CONVERTER_REGISTRY, key)
    with pytest.raises(ConversionError, match=r"node 'node_linear' \(Gemm\)"):  # (Grad-CAM needs no conversion)
        explainer.gradient_attribution(net, chelsea, 0, verbose=False)


def test_module_failing_at_run_time_is_named(monkeypatch, chelsea):
    """A converted module that raises when it runs is refused with the ONNX node and op that failed."""
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription
    from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

    class Broken(torch.nn.Module):
        def forward(self, *args):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    net = explainer.load(exports.export("resnet18", "dynamo"))
    monkeypatch.setitem(_CONVERTER_REGISTRY, OperationDescription("", "Gemm", 13),
                        lambda node, graph: OperationConverterResult(torch_module=Broken(),
                                                                     onnx_mapping=onnx_mapping_from_node(node)))
    with pytest.raises(ConversionError, match=r"fails at node 'node_linear' \(Gemm\): RuntimeError: mat1"):
        explainer.gradient_attribution(net, chelsea, 0, verbose=False)
