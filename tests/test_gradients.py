"""Gradient methods equal Captum and pytorch-grad-cam on the converted module."""
import numpy as np
import pytest
import torch
from onnx import numpy_helper

import explainer
from explainer.errors import InvalidParameterError, UnknownClassError, UnknownLayerError
from explainer.methods.gradcam import GradCAM
from explainer.methods.gradients import pixel_attributions
from explainer.runtime.torch_engine import torch_engine

import references


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
    """With their signs: d score / d pixel against Captum's Saliency with abs=False (a negated or
    abs'd gradient fails), guided backpropagation against GuidedBackprop."""
    from captum.attr import GuidedBackprop, Saliency

    model = torch_engine(default_net).pixel_model
    ref = (Saliency(model).attribute(_x(image224), target=285, abs=False) if method == "autodiff"
           else GuidedBackprop(model).attribute(_x(image224), target=285)).detach().numpy()
    ours = pixel_attributions(default_net, image224, 285, method=method)
    assert (ref < 0).mean() > 0.1 and (ref > 0).mean() > 0.1  # both signs occur: a sign error shows
    _close(ours, ref)


def test_integrated_gradients_equal_captum(default_net, image224):
    from captum.attr import IntegratedGradients

    model = torch_engine(default_net).pixel_model
    ref = IntegratedGradients(model).attribute(_x(image224), baselines=0.0, target=282, n_steps=20,
                                               method="gausslegendre", internal_batch_size=8)
    ours = pixel_attributions(default_net, image224, 282, method="integrated-gradients", steps=20,
                              batch_size=8)
    ref = ref.detach().numpy()
    assert (ref < 0).mean() > 0.1 and (ref > 0).mean() > 0.1
    _close(ours, ref)
    # the public map: the sum over channels of |attribution|, rescaled to [0, 1]
    public = explainer.integrated_gradients(default_net, image224, 282, steps=20, batch_size=8, verbose=False)
    _close(public, references.rescale(np.abs(ref[0]).sum(axis=0)), tol=1e-4)


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
def test_gradcam_equals_pytorch_grad_cam(request, chelsea, model_fixture):
    """In the feature layer's units, unscaled on both sides: at the layer's resolution against
    pytorch-grad-cam's own CAM (its scaling switched off), and the public map at the image's size
    against that CAM upsampled with the documented bicubic filter and clipped at 0. Grad-CAM's weights
    are means of the gradients: sums would be off by the layer's h x w."""
    from pytorch_grad_cam import GradCAM as ReferenceGradCAM

    net = request.getfixturevalue(model_fixture)
    cam = GradCAM(net)
    module, _ = cam.engine.module_for(cam.feature_layer)
    ref = references.raw_cam(ReferenceGradCAM, cam.engine.pixel_model, module, _x(chelsea), 285)
    low = cam.low_resolution(chelsea, [285])[0]
    assert ref.shape == low.shape and ref.shape[0] > 1
    references.assert_close_in_units(low, ref, 1e-5, "Grad-CAM at the feature layer")
    public = explainer.gradcam(net, chelsea, 285)
    expected = np.maximum(references.bicubic_upsample(ref, chelsea.shape[:2]), 0)
    references.assert_close_in_units(public, expected, 1e-5, "Grad-CAM at the image's size")


def test_gradcam_weights_are_means_of_the_gradients_hand_computed():
    """A graph whose class score reads every pixel of the feature layer through a dense layer, so the
    gradient differs at every location and is known: d score_t / d A[c, h, w] = D[t, c, h, w]. Grad-CAM
    weighs channel c by the mean of D[t, c] over the 16 x 16 locations (a sum would be 256 times larger)
    and keeps relu(sum_c w_c A_c); at the image's size that map upsampled bicubically, clipped at 0."""
    from graphs import dense_classifier, weights

    net = explainer.load(dense_classifier(), preprocessing="none")
    dense = next(numpy_helper.to_array(t) for t in net.source_model.graph.initializer if t.name == "D")
    w, b = weights(4, 3)
    image = np.random.default_rng(4).integers(0, 256, (16, 16, 3)).astype(np.uint8)

    def expected_cam(pixels, target):
        acts = np.maximum(np.einsum("kc,hwc->khw", w.astype(np.float64), pixels.astype(np.float64))
                          + b[:, None, None], 0)
        channel_weights = dense[target].reshape(4, 16, 16).astype(np.float64).mean(axis=(1, 2))
        return np.maximum(np.einsum("k,khw->hw", channel_weights, acts), 0)

    checked = 0
    for target in range(4):
        cam = expected_cam(image, target)
        if cam.max() == 0:  # a class no location raises: a DegenerateMapError (tested elsewhere)
            continue
        low = GradCAM(net, feature_layer="relu1").low_resolution(image.astype(np.float32), [target])[0]
        references.assert_close_in_units(low, cam, 1e-5, f"Grad-CAM of class {target}")
        references.assert_close_in_units(explainer.gradcam(net, image, target, feature_layer="relu1"), cam, 1e-5)
        checked += 1
    assert checked >= 2
    big = np.random.default_rng(5).integers(0, 256, (40, 24, 3)).astype(np.uint8)
    cam = expected_cam(net.prepare(big)[0][0], 1)
    references.assert_close_in_units(explainer.gradcam(net, big, 1, feature_layer="relu1"),
                                     np.maximum(references.bicubic_upsample(cam, (40, 24)), 0), 1e-5)


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


def test_gradient_maps_equal_captum_at_the_image_size(default_net, chelsea):
    """The public maps, at the image's own size (the gradient flows back through the resize): the sum
    over channels of |Captum's attribution|, rescaled to [0, 1], per label."""
    from captum.attr import GuidedBackprop, Saliency

    model = torch_engine(default_net).pixel_model
    x = _x(chelsea)

    def expected(attribution, target):
        return references.rescale(np.abs(attribution(x, target=target).detach().numpy()[0]).sum(axis=0))

    saliency = Saliency(model)
    two = explainer.saliency(default_net, chelsea, [285, 281])
    assert two.shape == (2, *chelsea.shape[:2]) and two.dtype == np.float32
    for k, target in enumerate((285, 281)):
        _close(two[k], expected(lambda *a, **kw: saliency.attribute(*a, abs=False, **kw), target), tol=1e-4)
    guided = explainer.gradient_attribution(default_net, chelsea, 285, method="guided-backprop")
    _close(guided, expected(GuidedBackprop(model).attribute, 285), tol=1e-4)


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
    torch_gradcam = GradCAM(default_net, runs_on="torch")  # explainer.gradcam runs on onnxruntime here
    torch_gradcam(image224, 285)
    explainer.gradient_attribution(default_net, image224, 285, method="guided-backprop")
    assert _hooks(engine.pixel_model) == []

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(torch.autograd, "grad", broken)
    for call in (lambda: torch_gradcam(image224, 285),
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


def test_float32_exact_switches_tf32_off_and_restores_it():
    """TF32 would round the module's CUDA matmuls to 10 bits; ``float32_exact("cuda")`` switches it off
    around the library's own work and leaves the user's process-wide choice as it was (the switches
    exist and are read on any machine)."""
    from explainer.runtime.torch_engine import float32_exact

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
        with float32_exact("cpu"):  # nothing to switch on the CPU
            assert backends.cuda.matmul.allow_tf32 and backends.cudnn.allow_tf32
    finally:
        backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32 = saved


NEEDS_CUDA = "needs CUDA: TF32 is switched only around work on a CUDA device"


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NEEDS_CUDA)
def test_tf32_is_off_only_while_the_module_runs_on_cuda(default_net, image224):
    """While Grad-CAM runs the converted module on the GPU, TF32 is off (seen from inside the
    module's forward); after it, the user's choice is back."""
    engine = torch_engine(default_net)
    assert engine.device == "cuda"
    backends = torch.backends
    saved = backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32
    seen = []
    handle = engine.pixel_model.register_forward_pre_hook(
        lambda module, args: seen.append((backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32)))
    try:
        backends.cuda.matmul.allow_tf32 = backends.cudnn.allow_tf32 = True
        GradCAM(default_net, runs_on="torch")(image224, "tabby")  # explainer.gradcam runs on onnxruntime
        assert seen and all(s == (False, False) for s in seen), seen
        assert backends.cuda.matmul.allow_tf32 and backends.cudnn.allow_tf32
    finally:
        handle.remove()
        backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32 = saved
