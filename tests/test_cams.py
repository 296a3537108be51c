"""Grad-CAM++ and Score-CAM equal pytorch-grad-cam's GradCAMPlusPlus and ScoreCAM on the converted
module; Score-CAM itself runs on onnxruntime only."""
import cv2
import numpy as np
import pytest
import torch

import explainer
from explainer.methods.gradcam_plus_plus import GradCAMPlusPlus
from explainer.methods.score_cam import low_resolution
from explainer.model.torch_engine import torch_engine


@pytest.fixture(scope="module")
def image224(chelsea):
    from explainer.model.preprocess import resize

    return np.rint(resize(chelsea.astype(np.float32), (224, 224))).astype(np.uint8)


def _min_max(m):
    m = m - m.min()
    return m / (1e-7 + m.max())


def _as_pytorch_grad_cam_scales(low):
    """pytorch-grad-cam's normalisation: min-max, bilinear resize to the input, min-max again."""
    return _min_max(cv2.resize(_min_max(low), (224, 224)))


def _reference(cam_class, engine, layer, image, target):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    module, _ = engine.module_for(layer)
    x = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None].requires_grad_(True)
    with cam_class(model=engine.pixel_model, target_layers=[module]) as cam:
        if hasattr(cam, "batch_size"):
            cam.batch_size = 16
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(target)])[0]


@pytest.mark.parametrize("model_fixture", ["default_net", "googlenet_graph"])
def test_gradcam_plus_plus_equals_pytorch_grad_cam(request, image224, model_fixture):
    from pytorch_grad_cam import GradCAMPlusPlus as Reference

    net = request.getfixturevalue(model_fixture)
    cam = GradCAMPlusPlus(net)
    ref = _reference(Reference, cam.engine, cam.feature_layer, image224, 285)
    low = cam.low_resolution(image224.astype(np.float32), [285])[0]
    np.testing.assert_allclose(_as_pytorch_grad_cam_scales(low), ref, atol=1e-4)
    # and it is not Grad-CAM: the weights differ
    grad = explainer.gradcam(net, image224, 285)
    assert np.corrcoef(grad.ravel(), explainer.gradcam_plus_plus(net, image224, 285).ravel())[0, 1] < 0.9999


def test_score_cam_equals_pytorch_grad_cam(default_net, image224):
    """On a shallow layer of 32 channels (32 forward passes on each side)."""
    from pytorch_grad_cam import ScoreCAM

    layer = default_net.layer("/Clip")
    engine = torch_engine(default_net)
    ref = _reference(ScoreCAM, engine, layer.name, image224, 285)
    low = low_resolution(default_net, image224.astype(np.float32), layer, [285], batch=8)[0]
    np.testing.assert_allclose(_as_pytorch_grad_cam_scales(low), ref, atol=1e-4)


def test_score_cam_needs_no_conversion(monkeypatch, default_net, image224):
    """Forward passes only: it runs where the torch engine would refuse the graph."""
    import explainer.model.torch_engine as te

    def refuse(*args, **kwargs):
        raise AssertionError("Score-CAM must not convert the graph")

    monkeypatch.setattr(te, "torch_engine", refuse)
    several = explainer.score_cam(default_net, image224, [285, 281], feature_layer="/Clip", verbose=False)
    one = explainer.score_cam(default_net, image224, 281, feature_layer="/Clip", verbose=False)
    assert several.shape == (2, 224, 224) and several.dtype == np.float32
    np.testing.assert_allclose(several[1], one, rtol=1e-5, atol=1e-7)  # labels share the passes
