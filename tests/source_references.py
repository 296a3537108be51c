"""Independent references for the compatibility suite: what the gradient methods give on the **source
torch model** an export was made from (``exports.build(family)``), by the reference libraries
(pytorch-grad-cam, Captum), and what the forward-only methods' perturbed images score when run on
onnxruntime by hand (``ort_probabilities``: the file, a session of its own, preprocessing written here).

``TARGETS`` is the one table of Grad-CAM layers: family -> the source module whose output is the tensor
our default layer (``explainer.gradcam_layers``) picks, how that output is laid out, and where it is not
the layer pytorch-grad-cam's README documents, why. pytorch-grad-cam runs at that module with the
reshape transform of its tutorials (tokens: drop the class/distillation tokens, lay the rest on the
grid; channels-last grids: permute).

Pixels: the suite explains integer pixels at the network's size, so no resize lies between the pixels
and the model input: model input = (pixels / 255 - mean) / std (ImageNet), and every gradient here is
with respect to the pixels (0..255, as ours), i.e. the model input's gradient / (255 std[c]).

Results are kept beside the exports (``exports.cache_root() / "reference-methods"``), keyed by the
family's recipe, the pixels, the labels and ``VERSION``; a cold case builds its source model once.
"""
from __future__ import annotations

import functools
import gc
import hashlib
import zlib
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

import exports

VERSION = 8  # bump when what a reference computes changes


#: deep_dream_image's floor on the mean gradient magnitude that normalises each step
DREAM_FLOOR = 1e-12


@dataclass(frozen=True)
class Target:
    module: str  # dotted path in the source model (``model.get_submodule``)
    layout: str  # "chw" (N, C, H, W), "nhwc" (N, H, W, C) or "tokens" (N, prefix + H * W, C)
    prefix: int = 0  # class / distillation tokens before the grid
    documented: str = ""  # pytorch-grad-cam README's layer where it is another module, and why ours differs


TARGETS = {
    "resnet18": Target("layer4.1", "chw", documented="layer4[-1]"),
    # Conv2dNormActivation: conv, BN, Hardswish (576, 7, 7)
    "mobilenet_v3_small": Target("features.12", "chw", documented="features[-1]"),
    "googlenet": Target("inception5b", "chw"),  # the last inception block's concatenation
    # torchvision Swin: features -> norm (channels last) -> permute -> pool. The README's
    # layers[-1].blocks[-1].norm2 is the input of the last block's MLP; the score reads the final norm's
    # grid (after that MLP's residual): ours and the reference are that tensor
    "swin_tv": Target("norm", "nhwc", documented="layers[-1].blocks[-1].norm2: inside the last block, before "
                                                 "its MLP; ours is the final norm's grid the pool reads"),
    "swin_t": Target("norm", "nhwc", documented="layers[-1].blocks[-1].norm2 (as swin_tv)"),
    "swin_timm": Target("norm", "nhwc", documented="layers[-1].blocks[-1].norm2 (as swin_tv)"),
    "swin_tiny": Target("norm", "nhwc", documented="layers[-1].blocks[-1].norm2 (as swin_tv)"),
    # timm's bn2 is BatchNormAct2d: BN then SiLU, the README's conv_head / bn2 with its activation
    "efficientnet_b0": Target("bn2", "chw", documented="conv_head / bn2 (bn2 includes the SiLU)"),
    "convnext_atto": Target("stages.3", "chw", documented="stages[-1]"),
    "regnetx_002": Target("s4", "chw"),  # final_conv is Identity: the last stage feeds the pool
    "densenet121": Target("features.norm5", "chw", documented="features[-1] (norm5 with its ReLU)"),
    "vit_tiny": Target("blocks.11.norm1", "tokens", 1, documented="blocks[-1].norm1"),
    "deit_tiny_distilled": Target("blocks.11.norm1", "tokens", 2, documented="blocks[-1].norm1"),
    "mobilevit_xxs": Target("final_conv", "chw"),
    "levit_128s": Target("stages.2", "tokens", 0),  # the last stage's 4 x 4 tokens, averaged by the head
    # class attention (CaiT): the norm before the last class-attention block, over [class token, patches]
    "cait_xxs24": Target("blocks_token_only.1.norm1", "tokens", 1, documented="blocks_token_only[-1].norm1"),
    "cait_xxs24_full": Target("blocks_token_only.1.norm1", "tokens", 1, documented="blocks_token_only[-1].norm1"),
    "edgenext_xx_small": Target("stages.3", "chw"),
    "efficientvit_b0": Target("head.in_conv", "chw"),  # the head's 1x1 ConvNormAct, before its pool
    "poolformerv2_s12": Target("stages.3", "chw"),
}


def reshape_transform(target: Target):
    """pytorch-grad-cam's reshape_transform for the target's layout (its ViT and Swin tutorials)."""
    if target.layout == "nhwc":
        return lambda t: t.permute(0, 3, 1, 2)
    if target.layout == "tokens":
        def tokens(t, prefix=target.prefix):
            side = int(round((t.shape[1] - prefix) ** 0.5))
            return t[:, prefix:, :].reshape(t.shape[0], side, side, t.shape[2]).permute(0, 3, 1, 2)
        return tokens
    return None


def source_model(family: str):
    """The seeded source model in eval mode, in-place ReLUs made out-of-place (Captum's guided
    backprop hooks cannot modify a view in place), wrapped to take pixels (N, 3, H, W) in 0..255."""
    import torch

    model = exports.build(family)
    for m in model.modules():
        if isinstance(m, torch.nn.ReLU):
            m.inplace = False

    class Pixels(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net
            self.register_buffer("mean", torch.tensor(exports.MEAN).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(exports.STD).view(1, 3, 1, 1))

        def forward(self, pixels):
            return self.net((pixels / 255.0 - self.mean) / self.std)

    return Pixels(model).eval()


def references(family: str, pixels: np.ndarray, labels) -> dict[str, np.ndarray]:
    """For one network-size image ``pixels`` (H, W, 3) and class ``labels``: "cam" (K, h, w) the raw
    Grad-CAM (ReLU of the gradient-mean-weighted channels, unnormalised) by pytorch-grad-cam at
    ``TARGETS[family]``; "gradient" and "guided" (K, 3, H, W) Captum's Saliency (signed) and
    GuidedBackprop w.r.t. the pixels; "dream" (H, W, 3) one deep-dream step from the image on
    channel "dream_channel" of the target layer, the one varying most over the image (ascent along
    the gradient of the channel's mean activation, normalised by its mean magnitude, 2 pixels per
    unit: MATLAB's deepDreamImage step; "dream_gradient" its mean magnitude), "dream_score" the same
    step on the first label's score, with "..._noise" the float32 sensitivities. Cached."""
    labels = [int(k) for k in labels]
    digest = hashlib.sha256(pixels.astype(np.float32).tobytes()
                            + repr((labels, TARGETS[family], VERSION)).encode()).hexdigest()[:16]
    recipe = zlib.crc32(repr(exports.FAMILIES[family]).encode())
    path = exports.cache_root() / "reference-methods" / f"{family}-{recipe:08x}-{digest}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as stored:
            return {k: stored[k] for k in stored.files}
    result = _compute(family, pixels, labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.npz")
    np.savez(partial, **result)
    partial.replace(path)
    return result


def _compute(family, pixels, labels):
    import torch
    from captum.attr import GuidedBackprop, Saliency

    target = TARGETS[family]
    model = source_model(family)
    module = model.net.get_submodule(target.module)
    transform = reshape_transform(target)
    x = torch.from_numpy(np.ascontiguousarray(pixels, np.float32)).permute(2, 0, 1)[None].repeat(len(labels), 1, 1, 1)
    out = {}
    with torch.enable_grad():
        out["cam"] = raw_grad_cam(model, module, x, labels, transform)
        # each gradient twice, the second with channels-last input (other kernels, other rounding):
        # their difference is the reference's own float32 sensitivity ("..._noise", of the range),
        # large where ReLU gates or max-pool ties sit within rounding of a switch (GoogLeNet: 3e-2)
        layouts = (torch.contiguous_format, torch.channels_last)
        for key, attribute in (("gradient", lambda a: Saliency(model).attribute(a, target=labels, abs=False)),
                               ("guided", lambda a: GuidedBackprop(model).attribute(a, target=labels))):
            with guided_functional_relu() if key == "guided" else _nothing():  # Captum hooks nn.ReLU only
                first, second = (attribute(x.clone().contiguous(memory_format=f)).detach().numpy() for f in layouts)
            out[key] = first
            out[key + "_noise"] = np.float64(np.abs(first - second).max() / np.abs(first).max())
        out["dream"], out["dream_channel"], out["dream_noise"], out["dream_gradient"] = _dream_step(
            model, module, transform, pixels)
        # and on the class score (top label): the step along Captum's gradient above
        g = torch.from_numpy(out["gradient"][0])
        score_step = (x[0] + 2.0 * g / g.abs().mean().clamp_min(DREAM_FLOOR)).clamp(0, 255)
        out["dream_score"] = score_step.permute(1, 2, 0).numpy()
    del model, module
    gc.collect()
    return out


@contextmanager
def _nothing():
    yield


def raw_grad_cam(model, module, x, labels, transform=None) -> np.ndarray:
    """pytorch-grad-cam's GradCAM of ``model`` at ``module`` for a batch ``x`` (one row per label),
    its own steps (``BaseCAM.forward``: ``ActivationsAndGradients``, the targets' summed scores
    backwards, ``get_cam_image``) and ReLU, without its min-max scaling and resize: (K, h, w), in the
    layer's units."""
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = GradCAM(model=model, target_layers=[module], reshape_transform=transform)
    try:
        with torch.enable_grad():
            outputs = cam.activations_and_grads(x.detach().clone().requires_grad_(True))
            model.zero_grad()
            sum(t(o) for t, o in zip([ClassifierOutputTarget(int(k)) for k in labels], outputs)).backward()
        acts = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients[0].numpy()
        raw = cam.get_cam_image(x, module, None, acts, grads, eigen_smooth=False)
    finally:
        cam.activations_and_grads.release()
    return np.maximum(raw, 0).astype(np.float32)


def guided_functional_relu():
    """A torch function mode in which every relu call (``F.relu``, ``torch.relu``, ``Tensor.relu``, in
    place or not) passes back only positive gradients, as Captum's GuidedBackprop does at ``nn.ReLU``
    modules; where both apply (``nn.ReLU`` calls ``F.relu``) the clamp is applied twice, which is the
    same."""
    import torch
    from torch.overrides import TorchFunctionMode

    class Guided(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            out = x.clamp(min=0)
            ctx.save_for_backward(out)
            return out

        @staticmethod
        def backward(ctx, grad):
            (out,) = ctx.saved_tensors
            return (grad * (out > 0)).clamp(min=0)

    relus = {torch.relu, torch.relu_, torch.nn.functional.relu, torch.Tensor.relu, torch.Tensor.relu_}

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in relus and torch.is_grad_enabled():
                return Guided.apply(args[0])
            return func(*args, **(kwargs or {}))

    return Mode()


def _dream_step(model, module, transform, start):
    """(the step, the channel, the step's float32 sensitivity: the same step from channels-last input,
    max difference / max |step|)."""
    import torch

    steps = []
    channel = None
    for layout in (torch.contiguous_format, torch.channels_last):
        captured = []
        handle = module.register_forward_hook(lambda m, i, o: captured.append(o))
        try:
            x = torch.from_numpy(np.ascontiguousarray(start, np.float32)).permute(2, 0, 1)[None]
            x = x.contiguous(memory_format=layout).requires_grad_(True)
            model(x)
            acts = captured[0] if transform is None else transform(captured[0])
            if channel is None:
                # the channel varying most over the image: a constant channel's gradient is rounding
                # noise (MobileNetV3's most active one: 1e-13)
                channel = int(acts[0].flatten(1).std(dim=1).argmax())
            (grad,) = torch.autograd.grad(acts[0, channel].mean(), x)
            assert float(grad.abs().max()) > 0, "deep dream: no gradient to compare"
        finally:
            handle.remove()
        # deep_dream_image floors the normalising mean magnitude at 1e-12 (explainer/methods/deepdream.py,
        # undocumented): the seeded MobileNetV3 and LeViT, whose last features barely depend on the image,
        # have gradients of 1e-13 there, so their steps are 1e-13/1e-12 of the documented size; the
        # reference applies the same floor (a finding reported with #32)
        step = (x + 2.0 * grad / grad.abs().mean().clamp_min(DREAM_FLOOR)).clamp(0, 255)
        steps.append(step[0].permute(1, 2, 0).detach().numpy())
    moved = np.abs(steps[0] - start).max()
    return (steps[0], np.int64(channel), np.float64(np.abs(steps[0] - steps[1]).max() / moved),
            np.float64(grad.abs().mean()))


# onnxruntime, by hand -----------------------------------------------------------------------------

def ort_probabilities(path, variant: str, images: np.ndarray) -> np.ndarray:
    """Class probabilities (N, K) of pixel images (N, H, W, 3) in 0..255 run through the ONNX file with
    a session of its own and the preprocessing the export was made for (ImageNet mean/std, NCHW; the
    ``production`` variant takes NHWC uint8 and ends in its own softmax), one image per run."""
    session = _session(str(path))
    name = session.get_inputs()[0].name
    rows = []
    for img in images:
        if variant == "production":
            feed = np.clip(np.rint(img), 0, 255).astype(np.uint8)[None]
        else:
            x = (img.astype(np.float32) / np.float32(255) - np.float32(exports.MEAN)) / np.float32(exports.STD)
            feed = x.transpose(2, 0, 1)[None].astype(np.float16 if variant == "fp16" else np.float32)
        scores = session.run(None, {name: feed})[0].astype(np.float64).reshape(-1)
        if variant != "production":
            scores = np.exp(scores - scores.max())
            scores /= scores.sum()
        rows.append(scores)
    return np.asarray(rows)


@functools.lru_cache(maxsize=1)  # the checks of one case share it; the next case's file replaces it
def _session(path: str):
    import onnxruntime as ort

    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])
