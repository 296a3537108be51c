"""Grad-CAM++ and Score-CAM equal pytorch-grad-cam's GradCAMPlusPlus and ScoreCAM on the converted
module; Score-CAM itself runs on onnxruntime only."""
import warnings

import numpy as np
import pytest
import torch

import explainer
from explainer.methods.gradcam_plus_plus import GradCAMPlusPlus
from explainer.methods.score_cam import low_resolution
from explainer.runtime.torch_engine import torch_engine

import references


@pytest.fixture(scope="module")
def image224(chelsea):
    from explainer.model.preprocess import resize

    return np.rint(resize(chelsea.astype(np.float32), (224, 224))).astype(np.uint8)


def _x(image):
    return torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]


@pytest.mark.parametrize("model_fixture", ["default_net", "googlenet_graph"])
def test_gradcam_plus_plus_equals_pytorch_grad_cam(request, chelsea, model_fixture):
    """Unscaled, in the feature layer's units: at the layer's resolution against pytorch-grad-cam's
    own CAM (its min-max scaling switched off), and the public map at the image's size against that
    CAM upsampled with the documented bicubic filter and clipped at 0."""
    from pytorch_grad_cam import GradCAMPlusPlus as Reference

    net = request.getfixturevalue(model_fixture)
    cam = GradCAMPlusPlus(net)
    module, _ = cam.engine.module_for(cam.feature_layer)
    ref = references.raw_cam(Reference, cam.engine.pixel_model, module, _x(chelsea), 285)
    low = cam.low_resolution(chelsea, [285])[0]
    references.assert_close_in_units(low, ref, 1e-5, "Grad-CAM++ at the feature layer")
    public = explainer.gradcam_plus_plus(net, chelsea, 285)
    expected = np.maximum(references.bicubic_upsample(ref, chelsea.shape[:2]), 0)
    references.assert_close_in_units(public, expected, 1e-5, "Grad-CAM++ at the image's size")
    # and it is not Grad-CAM: the weights differ
    grad = explainer.gradcam(net, chelsea, 285)
    assert np.corrcoef(grad.ravel(), public.ravel())[0, 1] < 0.9999


def test_score_cam_equals_pytorch_grad_cam(default_net, image224):
    """On a shallow layer of 32 channels at 112 x 112 (32 forward passes on each side; ours on
    onnxruntime, pytorch-grad-cam's on the converted module), unscaled: at the layer's resolution and
    the public map upsampled to 224 x 224."""
    from pytorch_grad_cam import ScoreCAM

    layer = default_net.layer("/Clip")
    engine = torch_engine(default_net)
    module, _ = engine.module_for(layer.name)
    ref = references.raw_cam(ScoreCAM, engine.pixel_model, module, _x(image224), 285, batch_size=16)
    low = low_resolution(default_net, image224.astype(np.float32), layer, [285], batch=8)[0]
    assert ref.shape == low.shape == (112, 112)
    references.assert_close_in_units(low, ref, 1e-4, "Score-CAM at the feature layer")
    public = explainer.score_cam(default_net, image224, 285, feature_layer="/Clip", batch_size=8, verbose=False)
    expected = np.maximum(references.bicubic_upsample(ref, (224, 224)), 0)
    references.assert_close_in_units(public, expected, 1e-4, "Score-CAM at the image's size")


def test_score_cam_needs_no_conversion(monkeypatch, default_net, image224):
    """Forward passes only: it runs where the torch engine would refuse the graph."""
    import explainer.runtime.torch_engine as te

    def refuse(*args, **kwargs):
        raise AssertionError("Score-CAM must not convert the graph")

    monkeypatch.setattr(te, "torch_engine", refuse)
    several = explainer.score_cam(default_net, image224, [285, 281], feature_layer="/Clip", verbose=False)
    one = explainer.score_cam(default_net, image224, 281, feature_layer="/Clip", verbose=False)
    assert several.shape == (2, 224, 224) and several.dtype == np.float32
    np.testing.assert_allclose(several[1], one, rtol=1e-5, atol=1e-7)  # labels share the passes


@pytest.mark.parametrize("grid,size", [((7, 7), (300, 451)), ((14, 14), (150, 226)), ((7, 7), (7, 300)),
                                       ((12, 9), (37, 1001)), ((28, 28), (20, 500)), ((1, 1), (10, 10))])
def test_map_upsampling_is_pils_bicubic(grid, size):
    """The CAMs' upsampling (two products with PIL's coefficient matrices, export/resize.py) equals the
    library's bicubic resize of maps, PIL's own (``resize_map``), within 1e-6 of the map's range: up,
    down, one axis only, a 1 x 1 grid."""
    from explainer.export.resize import upsample
    from explainer.model.preprocess import resize_map

    maps = np.random.default_rng(sum(grid) + sum(size)).standard_normal((3, *grid)).astype(np.float32)
    ours, pil = upsample(maps, size), resize_map(maps, size)
    assert ours.shape == pil.shape == (3, *size) and ours.dtype == np.float32
    assert np.abs(ours - pil).max() <= 1e-6 * max(np.ptp(pil), 1e-30)


def test_public_gradcam_is_its_low_resolution_map_upsampled_by_pil(default_net, chelsea):
    """``explainer.gradcam``'s map at the image's size is its feature-grid map resized by PIL's bicubic
    (``resize_map``) and cut at 0, within 1e-6 of the range."""
    from explainer.methods.gradcam import GradCAM
    from explainer.model.preprocess import resize_map

    low = GradCAM(default_net).low_resolution(default_net.fit_pixels(chelsea.astype(np.float32)), [281])
    expected = np.maximum(resize_map(low, chelsea.shape[:2]), 0.0)
    got = explainer.gradcam(default_net, chelsea, 281)
    assert got.shape == chelsea.shape[:2]
    assert np.abs(got - expected[0]).max() <= 1e-6 * np.ptp(expected)


class _TokenAttention(torch.nn.Module):
    """A class-token transformer block whose attention softmax is not over all the tokens: ``factorised``
    (CoaT: the keys' softmax over the tokens, axis -2) or ``strided`` (CvT: the keys and values pooled
    2 x 2 on the patch grid, the class token's beside them); a final norm, and a head reading the class
    token."""

    def __init__(self, mode: str, c: int = 16, k: int = 5):
        super().__init__()
        torch.manual_seed(0)
        self.mode = mode
        self.patch = torch.nn.Conv2d(3, c, 8, 8)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, c) * 0.5)
        self.norm1 = torch.nn.LayerNorm(c)
        self.qkv = torch.nn.Linear(c, 3 * c)
        self.proj = torch.nn.Linear(c, c)
        self.norm = torch.nn.LayerNorm(c)
        self.head = torch.nn.Linear(c, k)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)  # (N, 64, c): an 8 x 8 grid
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1)
        h = self.norm1(t)
        q, k, v = self.qkv(h).chunk(3, -1)
        if self.mode == "factorised":
            a = q @ (k.softmax(dim=-2).transpose(1, 2) @ v)
        else:
            def pooled(z):
                grid = z[:, 1:].transpose(1, 2).reshape(z.shape[0], -1, 8, 8)
                return torch.cat([z[:, :1], torch.nn.functional.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)], 1)
            a = (q @ pooled(k).transpose(1, 2) * 0.25).softmax(-1) @ pooled(v)
        t = t + self.proj(a)
        return self.head(self.norm(t)[:, 0])


@pytest.mark.parametrize("mode", ["factorised", "strided"])
def test_default_layer_on_tokens_is_before_an_attention_over_other_axes(mode, tmp_path, chelsea):
    """A class-token model whose attention's softmax is over the tokens' axis -2 (CoaT) or over fewer keys
    than tokens (CvT) still gets its default Grad-CAM layer before the last attention (the block's
    norm1), where the patch tokens reach the class token's score, not the final norm, whose patch tokens
    the head never reads (an all-zero map); the map there equals Grad-CAM computed by torch autograd on
    the source module's norm1 output (mean gradient over the patch tokens as channel weights)."""
    from explainer.methods.gradcam import GradCAM, default_feature_layer

    model = _TokenAttention(mode).eval()
    path = tmp_path / "tokens.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(model, (torch.randn(1, 3, 64, 64),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["scores"])
    net = explainer.load(str(path), preprocessing="imagenet")
    layer, reason = default_feature_layer(net)
    assert "norm1" in layer and "before the last attention" in reason, (layer, reason)
    pixels = net.fit_pixels(chelsea)
    label = int(np.argmax(net.predict(chelsea)))
    ours = GradCAM(net).low_resolution(pixels, [label])[0]

    captured = {}
    model.norm1.register_forward_hook(lambda m, i, o: captured.update(a=o))
    x = torch.from_numpy(net.to_model_input(pixels[None]))
    score = model(x)[0, label]
    (grad,) = torch.autograd.grad(score, captured["a"])
    a, g = captured["a"][0, 1:].detach(), grad[0, 1:]  # the 64 patch tokens
    expected = torch.relu((a * g.mean(0)).sum(-1)).reshape(8, 8).numpy()
    assert expected.max() > 0
    np.testing.assert_allclose(ours, expected, atol=1e-4 * expected.max())
