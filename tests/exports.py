"""Real exports for the compatibility suite: torchvision and timm classifiers with seeded weights,
exported the ways users export them, cached between test runs.

Every family is built with ``pretrained=False`` from a fixed seed; BatchNorm statistics are calibrated
on random images (train-mode passes) so that scores are not flat. A file is made once per (family,
export, variant, torch and timm versions) in ``EXPORT_CACHE`` (default ``~/.cache/onnx-explainer-tests``,
outside the per-run test cache) and reused.

Exports: ``legacy`` (``torch.onnx.export(dynamo=False)``, opset 17, batch 1), ``legacy-dynamic``
(the same with a dynamic batch axis), ``legacy-old`` (the oldest opset the legacy exporter writes for
the model, 13, else 14 where attention needs it, with a dynamic batch axis: files made with older torch
versions, LayerNormalization written as ReduceMean/Sub/Pow/Sqrt/Div, ranks that shape inference loses),
``dynamo`` (the default exporter, opset 18+, weights in
``NAME.onnx.data``), ``dynamo-dynamic``. Variants: ``production`` (NHWC uint8 input, normalisation and
softmax inside the graph), ``fp16`` (the whole model in half precision), ``mixed`` (float32 input and
output, float16 inside), ``slim`` (onnxslim's copy), ``ingraph-LAYOUT-DTYPE`` (pixels 0..255 in that
layout and type, normalisation inside the graph), ``int8-qdq`` (onnxruntime.quantization's static
QDQ format, per-channel int8 weights, uint8 activations calibrated on 8 photographs) and
``int8-dynamic`` (its dynamic quantization: ConvInteger/MatMulInteger with DynamicQuantizeLinear).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
import zlib
from pathlib import Path

EXPORTS = ("legacy", "legacy-dynamic", "legacy-old", "dynamo", "dynamo-dynamic")
VARIANTS = ("plain", "production", "fp16", "mixed", "slim", "ingraph-nchw-float", "ingraph-nhwc-float",
            "ingraph-nchw-uint8", "int8-qdq", "int8-dynamic")
BUILD_VERSION = 3
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# name -> (library, constructor, keyword arguments); small configurations keep the suite fast, and
# every family built smaller here also runs at its published size (PUBLISHED)
FAMILIES = {
    "resnet18": ("torchvision", "resnet18", {}),
    "mobilenet_v3_small": ("torchvision", "mobilenet_v3_small", {}),
    # torchvision's own init (std 0.01) leaves GoogLeNet's scores nearly independent of the image
    "googlenet": ("torchvision", "googlenet", {"aux_logits": False, "init_weights": False}),
    "swin_tv": ("torchvision", "SwinTransformer", dict(patch_size=[4, 4], embed_dim=32, depths=[1, 1, 2, 1],
                                                       num_heads=[1, 2, 4, 8], window_size=[7, 7])),
    "efficientnet_b0": ("timm", "efficientnet_b0", {}),
    "convnext_atto": ("timm", "convnext_atto", {}),
    "regnetx_002": ("timm", "regnetx_002", {}),
    "densenet121": ("timm", "densenet121", {}),
    "vit_tiny": ("timm", "vit_tiny_patch16_224", {}),
    "deit_tiny_distilled": ("timm", "deit_tiny_distilled_patch16_224", {}),
    "swin_timm": ("timm", "swin_tiny_patch4_window7_224", dict(embed_dim=32, depths=(1, 1, 2, 1),
                                                              num_heads=(1, 2, 4, 8))),
    "mobilevit_xxs": ("timm", "mobilevit_xxs", {}),
    "levit_128s": ("timm", "levit_128s", {}),
    "cait_xxs24": ("timm", "cait_xxs24_224", dict(depth=4)),  # 4 of its 24 blocks, then class attention
    "edgenext_xx_small": ("timm", "edgenext_xx_small", {}),  # F.normalize: Clip(x, eps, "")
    # published sizes: the shrunk families above at their real depth and width, and families whose
    # full size hid failures the small ones did not show
    "swin_t": ("torchvision", "swin_t", {}),  # 2-2-6-2 blocks, width 96
    "swin_tiny": ("timm", "swin_tiny_patch4_window7_224", {}),
    "cait_xxs24_full": ("timm", "cait_xxs24_224", {}),  # all 24 blocks, then class attention
    "efficientvit_b0": ("timm", "efficientvit_b0", {}),
    "poolformerv2_s12": ("timm", "poolformerv2_s12", {}),
}
#: the families at their published configuration (run by `pytest -m published`, after the main suite)
PUBLISHED = ("swin_t", "swin_tiny", "cait_xxs24_full", "efficientvit_b0", "poolformerv2_s12", "levit_128s")


def cache_root() -> Path:
    import timm
    import torch

    root = Path(os.environ.get("EXPORT_CACHE", Path.home() / ".cache" / "onnx-explainer-tests"))
    return root / f"v{BUILD_VERSION}-torch{torch.__version__}-timm{timm.__version__}"


def build(family: str):
    """The seeded torch module of ``family``, BatchNorm calibrated, in eval mode."""
    import timm
    import torch
    import torchvision

    library, name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    if library == "timm":
        model = timm.create_model(name, pretrained=False, **kwargs)
    else:
        model = getattr(torchvision.models, name)(**kwargs)
    generator = torch.Generator().manual_seed(1)
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(torch.randn(8, 3, *input_size(model), generator=generator))
    model.eval()
    # the head rescaled so logits spread (std 3) on random images: softmax neither flat nor saturated
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1000]
    with torch.no_grad():
        for head in heads:  # a zero-initialised head (timm's Sequencer) gives every image the same scores
            if not head.weight.any():
                head.weight.normal_(0.0, 0.02, generator=generator)
        spread = float(model(torch.randn(4, 3, *input_size(model), generator=generator)).std())
        for head in heads:
            head.weight.mul_(3.0 / max(spread, 1e-6))
            if head.bias is not None:
                head.bias.mul_(3.0 / max(spread, 1e-6))
    return model


def input_size(model) -> tuple[int, int]:
    """The (height, width) the family takes: timm's pretrained config says, else 224 x 224."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("input_size", (3, 224, 224))[1:])


class Production(__import__("torch").nn.Module):
    """What deployment wrappers look like: NHWC uint8 in, normalisation and softmax inside."""

    def __init__(self, model):
        import torch

        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1) * 255)

    def forward(self, x):
        x = x.permute(0, 3, 1, 2).float()
        return self.model((x - self.mean) / self.std).softmax(dim=1)


class InGraph(__import__("torch").nn.Module):
    """Pixels 0..255 in (NCHW or NHWC, float or uint8), ImageNet normalisation inside the graph."""

    def __init__(self, model, nhwc: bool):
        import torch

        super().__init__()
        self.model, self.nhwc = model, nhwc
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1) * 255)

    def forward(self, x):
        x = (x.permute(0, 3, 1, 2) if self.nhwc else x).float()
        return self.model((x - self.mean) / self.std)


class Mixed(__import__("torch").nn.Module):
    """float32 in and out, float16 inside: what fp16 conversions that keep the I/O types produce."""

    def __init__(self, model):
        super().__init__()
        self.model = model.half()

    def forward(self, x):
        return self.model(x.half()).float()


def export(family: str, exporter: str = "legacy", variant: str = "plain") -> Path:
    """The path of the cached ONNX export (made on first use)."""
    if family not in FAMILIES or exporter not in EXPORTS or variant not in VARIANTS:
        raise KeyError((family, exporter, variant))
    recipe = zlib.crc32(repr(FAMILIES[family]).encode())  # a changed recipe is a new file
    path = cache_root() / f"{family}-{exporter}-{variant}-{recipe:08x}" / "model.onnx"
    if path.is_file():
        return path
    folder = Path(tempfile.mkdtemp(dir=_mkdir(cache_root()), prefix=".partial-"))
    _export_to(folder / "model.onnx", family, exporter, variant)
    shutil.rmtree(path.parent, ignore_errors=True)
    folder.rename(path.parent)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _export_to(path: Path, family: str, exporter: str, variant: str) -> None:
    import torch

    if variant.startswith("int8"):
        return _quantize(export(family, exporter), path, variant)

    model = build(family)
    size = input_size(model)
    x = torch.randn(1, 3, *size)
    if variant == "production":
        model = Production(model).eval()
        x = torch.randint(0, 256, (1, *size, 3), dtype=torch.uint8)
    elif variant == "fp16":
        model, x = model.half(), x.half()
    elif variant == "mixed":
        model = Mixed(model).eval()
    elif variant.startswith("ingraph"):
        _, layout, dtype = variant.split("-")
        model = InGraph(model, layout == "nhwc").eval()
        x = torch.randint(0, 256, (1, *size, 3) if layout == "nhwc" else (1, 3, *size),
                          dtype=torch.uint8 if dtype == "uint8" else torch.float32)
    dynamic = exporter.endswith("dynamic") or exporter == "legacy-old"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter.startswith("legacy"):
            opsets = (13, 14) if exporter == "legacy-old" else (17,)
            for opset in opsets:
                try:
                    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset,
                                      input_names=["input"], output_names=["scores"],
                                      dynamic_axes={"input": {0: "N"}, "scores": {0: "N"}} if dynamic else None)
                    break
                except torch.onnx.errors.UnsupportedOperatorError:  # scaled_dot_product_attention: 14
                    if opset == opsets[-1]:  # the last opset tried: no file was written
                        raise
        else:
            shapes = ({0: torch.export.Dim("N", min=1, max=1024)},) if dynamic else None
            program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=shapes, verbose=False)
            program.save(str(path), external_data=True)
    if variant == "slim":
        import onnxslim

        onnxslim.slim(str(path), str(path))


def _quantize(source: Path, path: Path, variant: str) -> None:
    """onnxruntime.quantization's static QDQ or dynamic int8 copy of the plain export ``source``."""
    import logging

    import numpy as np
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = onnx.load(str(source), load_external_data=False)
    image = model.graph.input[0]
    shape = [d.dim_value or 1 for d in image.type.tensor_type.shape.dim]

    class Calibration(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{image.name: x} for x in calibration_inputs(shape)])

        def get_next(self):
            return next(self.batches, None)

    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR  # the quantizer logs a warning per LayerNorm weight
    try:
        prepared = path.with_name("prepared.onnx")
        quant_pre_process(str(source), str(prepared))
        if variant == "int8-qdq":
            quantize_static(str(prepared), str(path), Calibration(), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        else:
            quantize_dynamic(str(prepared), str(path), weight_type=QuantType.QInt8,
                             op_types_to_quantize=["Conv", "MatMul", "Gemm"])
        prepared.unlink()
    finally:
        root.level = level


def calibration_inputs(shape) -> list:
    """8 photographs (scikit-image's astronaut, chelsea, coffee and rocket, and their mirror images)
    resized to the NCHW ``shape`` and ImageNet-normalised: the calibration set of the int8 variants.
    Tests of the int8 variants explain other images."""
    import cv2
    import numpy as np
    from skimage import data

    out = []
    for picture in (data.astronaut(), data.chelsea(), data.coffee(), data.rocket()):
        pixels = cv2.resize(picture, (shape[3], shape[2]), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
        for view in (pixels, pixels[:, ::-1]):
            x = (view - np.float32(MEAN)) / np.float32(STD)
            out.append(np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32))
    return out
