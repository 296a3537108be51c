"""Gradient methods equal Captum and pytorch-grad-cam on the converted module."""
import cv2
import numpy as np
import pytest
import torch

import explainer
from explainer.errors import InvalidParameterError, UnknownClassError, UnknownLayerError
from explainer.methods.gradcam import GradCAM
from explainer.methods.gradients import pixel_attributions
from explainer.model.torch_engine import torch_engine


@pytest.fixture(scope="module")
def image224(chelsea):
    from explainer.model.preprocess import resize

    return np.rint(resize(chelsea.astype(np.float32), (224, 224))).astype(np.uint8)


def _x(image):
    return torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]


def _close(ours, theirs, tol=1e-5):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    np.testing.assert_allclose(ours, theirs, rtol=tol, atol=tol * np.abs(theirs).max())


@pytest.mark.parametrize("method", ["autodiff", "guided-backprop"])
def test_saliency_and_guided_backprop_equal_captum(default_net, image224, method):
    from captum.attr import GuidedBackprop, Saliency

    model = torch_engine(default_net).pixel_model
    ref = (Saliency(model).attribute(_x(image224), target=285, abs=True) if method == "autodiff"
           else GuidedBackprop(model).attribute(_x(image224), target=285))
    ours = pixel_attributions(default_net, image224, 285, method=method)
    if method == "autodiff":
        ours = np.abs(ours)
    _close(ours, ref.detach().numpy())


def test_integrated_gradients_equal_captum(default_net, image224):
    from captum.attr import IntegratedGradients

    model = torch_engine(default_net).pixel_model
    ref = IntegratedGradients(model).attribute(_x(image224), baselines=0.0, target=282, n_steps=20,
                                               method="gausslegendre", internal_batch_size=8)
    ours = pixel_attributions(default_net, image224, 282, method="integrated-gradients", steps=20,
                              batch_size=8)
    _close(ours, ref.detach().numpy())


def test_smoothgrad_equals_captum_noise_tunnel(default_net, image224):
    from captum.attr import NoiseTunnel, Saliency

    model = torch_engine(default_net).pixel_model
    torch.manual_seed(5)
    ref = NoiseTunnel(Saliency(model)).attribute(_x(image224), nt_type="smoothgrad", nt_samples=6,
                                                 stdevs=0.1 * 255, target=285)
    ours = pixel_attributions(default_net, image224, 285, method="smoothgrad", samples=6,
                              noise_level=0.1, random_state=5)
    _close(ours, ref.detach().numpy())
    again = pixel_attributions(default_net, image224, 285, method="smoothgrad", samples=6,
                               noise_level=0.1, random_state=5)
    np.testing.assert_array_equal(ours, again)


@pytest.mark.parametrize("model_fixture", ["default_net", "googlenet_graph"])
def test_gradcam_equals_pytorch_grad_cam(request, image224, model_fixture):
    from pytorch_grad_cam import GradCAM as ReferenceGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    net = request.getfixturevalue(model_fixture)
    cam = GradCAM(net)
    module, _ = cam.engine.module_for(cam.feature_layer)
    with ReferenceGradCAM(model=cam.engine.pixel_model, target_layers=[module]) as reference:
        # our weights are frozen, so the graph is only recorded when the input asks for a gradient
        ref = reference(input_tensor=_x(image224).requires_grad_(True), targets=[ClassifierOutputTarget(285)])[0]
    low = cam.low_resolution(image224.astype(np.float32), [285])[0]

    def min_max(m):
        m = m - m.min()
        return m / (1e-7 + m.max())

    # pytorch-grad-cam's normalisation: min-max, bilinear resize to the input, min-max again
    ours = min_max(cv2.resize(min_max(low), (224, 224)))
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_gradcam_defaults_and_shapes(default_net, googlenet_graph, chelsea):
    assert explainer.gradcam_layers(googlenet_graph)[0] == \
        [l for l in googlenet_graph.layers() if l.op_type == "Concat"][-1].name  # last inception output
    feature, reduction = explainer.gradcam_layers(default_net)
    assert default_net.layer(feature).op_type == "Clip" and default_net.layer(feature).shape == (1280, 7, 7)
    assert default_net.layer(reduction).op_type == "Gemm"
    one = explainer.gradcam(default_net, chelsea, "Egyptian cat")
    several = explainer.gradcam(default_net, chelsea, ["Egyptian cat", 282])
    assert one.shape == chelsea.shape[:2] and several.shape == (2, *chelsea.shape[:2])
    assert one.dtype == np.float32 and one.min() >= 0 and one.max() > 0
    np.testing.assert_allclose(several[0], one, rtol=1e-4, atol=1e-6)
    batch = explainer.gradcam(default_net, [chelsea, chelsea[:200]], 285)
    assert isinstance(batch, list) and batch[1].shape == (200, 451)
    np.testing.assert_allclose(batch[0], one, rtol=1e-4, atol=1e-6)
    shallow = explainer.gradcam(default_net, chelsea, 285, feature_layer="/_blocks.2/Add")
    assert shallow.shape == one.shape and not np.allclose(shallow / shallow.max(), one / one.max(), atol=0.05)


def test_gradient_attribution_maps(default_net, chelsea):
    for method in ("autodiff", "guided-backprop"):
        m = explainer.gradient_attribution(default_net, chelsea, 285, method=method)
        assert m.shape == chelsea.shape[:2] and m.dtype == np.float32
        assert m.min() == 0.0 and m.max() == 1.0
    two = explainer.gradient_attribution(default_net, chelsea, [285, 281])
    assert two.shape == (2, *chelsea.shape[:2])


def test_errors(default_net, chelsea):
    with pytest.raises(UnknownClassError, match="Closest: 'Egyptian cat'"):
        explainer.gradcam(default_net, chelsea, "Egyptain cat")
    with pytest.raises(UnknownClassError, match=r"\[0, 999\]"):
        explainer.gradient_attribution(default_net, chelsea, 1000)
    with pytest.raises(InvalidParameterError, match="spatial"):
        explainer.gradcam(default_net, chelsea, 285, feature_layer="/_fc/Gemm")
    with pytest.raises(UnknownLayerError, match="Closest"):
        explainer.gradcam(default_net, chelsea, 285, feature_layer="/_blocks.2/Addd")
    with pytest.raises(InvalidParameterError, match="method must be one of"):
        explainer.gradient_attribution(default_net, chelsea, 285, method="deeplift")
    with pytest.raises(InvalidParameterError, match="steps"):
        explainer.gradient_attribution(default_net, chelsea, 285, method="integrated-gradients", steps=1)


def _hooks(module):
    return [(name, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for name, m in module.named_modules() if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks]


def test_hooks_never_leak(default_net, image224, monkeypatch):
    engine = torch_engine(default_net)
    x = _x(image224)
    with torch.no_grad():
        before = engine.pixel_model(x).clone()
    explainer.gradcam(default_net, image224, 285)
    explainer.gradient_attribution(default_net, image224, 285, method="guided-backprop")
    assert _hooks(engine.pixel_model) == []

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(torch.autograd, "grad", broken)
    for call in (lambda: explainer.gradcam(default_net, image224, 285),
                 lambda: explainer.gradient_attribution(default_net, image224, 285, method="guided-backprop")):
        with pytest.raises(RuntimeError, match="boom"):
            call()
        assert _hooks(engine.pixel_model) == []
    monkeypatch.undo()
    with torch.no_grad():
        np.testing.assert_array_equal(engine.pixel_model(x).numpy(), before.numpy())


def test_threads_take_turns_on_one_network(default_net, image224):
    """Grad-CAM records a layer and guided backpropagation rewrites every ReLU's backward on the
    module itself, and occlusion on the torch backend runs the same module: threads sharing one
    network take turns on it, and each gets what it gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = {
        "gradcam": lambda: explainer.gradcam(default_net, image224, "tabby"),
        "guided": lambda: explainer.gradient_attribution(default_net, image224, "tabby", method="guided-backprop",
                                                         verbose=False),
        "occlusion": lambda: explainer.occlusion_sensitivity(default_net, image224, "tabby", mask_size=64, stride=32,
                                                             backend="torch", batch_size=4, verbose=False),
    }
    alone = {name: job() for name, job in jobs.items()}
    with ThreadPoolExecutor(3) as pool:
        together = [(name, pool.submit(job)) for _ in range(3) for name, job in jobs.items()]
        for name, future in together:
            _close(future.result(), alone[name])


def test_tf32_is_off_only_while_the_module_runs_on_cuda(default_net, image224):
    """TF32 would round the module's CUDA matmuls to 10 bits; the library switches it off around its
    own work and leaves the user's process-wide choice as it was."""
    from explainer.model.torch_engine import float32_exact

    backends = torch.backends
    saved = backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32
    try:
        backends.cuda.matmul.allow_tf32 = backends.cudnn.allow_tf32 = True  # the user's choice
        with float32_exact("cuda"):
            assert not backends.cuda.matmul.allow_tf32 and not backends.cudnn.allow_tf32
            with float32_exact("cuda"):
                pass
            assert not backends.cuda.matmul.allow_tf32
        assert backends.cuda.matmul.allow_tf32 and backends.cudnn.allow_tf32
        explainer.gradcam(default_net, image224, "tabby")
        assert backends.cuda.matmul.allow_tf32 and backends.cudnn.allow_tf32
    finally:
        backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32 = saved
