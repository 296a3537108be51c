"""The cross-framework cases: which framework builds each classifier, which exporter writes its ONNX
file, and what the library is told about it. Plain Python (no numpy, no framework): imported by
build.py and the checker in the main venv, and by the export scripts inside each framework's venv.

A case's files live in ``$EXPORT_CACHE/frameworks/v<BUILD_VERSION>/<case>/`` (see build.py).
"""
from __future__ import annotations

import os
from pathlib import Path

#: bump to rebuild every case (a changed export script or requirement list rebuilds its own cases)
BUILD_VERSION = 1

#: preprocessing of Hugging Face's image processors, as the library's dict: mean/std in 0..1 units
HF_HALF = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "scale": 1 / 255, "channel_order": "RGB"}
HF_IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "scale": 1 / 255,
               "channel_order": "RGB"}
# MobileViT's processor rescales to 0..1 and flips RGB to BGR, without mean or std
HF_MOBILEVIT = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "scale": 1 / 255, "channel_order": "BGR"}


def _case(env, framework, exporter, model, size, preprocessing, layout, channels=3, optional=None, **extra):
    return dict(env=env, framework=framework, exporter=exporter, model=model, input_size=list(size),
                preprocessing=preprocessing, layout=layout, channels=channels, optional=optional, **extra)


# name -> what build.py and the export script need. ``env``: the venv that runs the export script
# (``main``: the main venv); ``model``: the export script's recipe; ``optional``: None, or the optional
# subset (SUBSETS below) that the case belongs to, built and tested only on request.
CASES: dict[str, dict] = {
    # TensorFlow / Keras 3, tf2onnx (from_keras) ---------------------------------------------------
    "keras-mobilenetv2-tf2onnx": _case("tf", "keras", "tf2onnx", "MobileNetV2", (224, 224), "tf", "NHWC",
                                       opset=17),
    "keras-efficientnetb0-tf2onnx": _case("tf", "keras", "tf2onnx", "EfficientNetB0", (224, 224), "none",
                                          "NHWC", opset=17),
    "keras-efficientnetv2b0-tf2onnx": _case("tf", "keras", "tf2onnx", "EfficientNetV2B0", (224, 224), "none",
                                            "NHWC", opset=18),
    "keras-resnet50-tf2onnx": _case("tf", "keras", "tf2onnx", "ResNet50", (224, 224), "caffe", "NHWC",
                                    opset=18),
    "keras-vit-tf2onnx": _case("tf", "keras", "tf2onnx", "vit", (48, 48), "none", "NHWC", opset=17),
    "keras-graycnn-tf2onnx": _case("tf", "keras", "tf2onnx", "graycnn", (32, 32), "unit", "NHWC", channels=1,
                                   opset=18),
    # recurrent layers over the rows of a feature map: tf2onnx writes Keras's LSTM as LSTM nodes, but both
    # exporters leave Keras 3's GRU (either reset_after) as TensorFlow's while loop: Loop nodes, reversed
    # sequences around them for the backward direction
    "keras-rowlstm-tf2onnx": _case("tf", "keras", "tf2onnx", "rowlstm", (32, 32), "none", "NHWC", opset=17),
    "keras-rowgru-export": _case("tf", "keras", "keras.export", "rowgru", (32, 32), "none", "NHWC", opset=17),
    "keras-rowgru-reset-before-tf2onnx": _case("tf", "keras", "tf2onnx", "rowgru-reset-before", (32, 32), "none",
                                               "NHWC", opset=17, optional="extra"),
    # tf2onnx's inputs_as_nchw: an NCHW input transposed inside the graph
    "keras-mobilenetv2-tf2onnx-nchw": _case("tf", "keras", "tf2onnx", "MobileNetV2", (224, 224), "tf", "NCHW",
                                            opset=17, inputs_as_nchw=True, optional="extra"),
    "keras-densenet121-tf2onnx": _case("tf", "keras", "tf2onnx", "DenseNet121", (224, 224), "imagenet", "NHWC",
                                       opset=13, optional="extra"),
    "keras-nasnetmobile-tf2onnx": _case("tf", "keras", "tf2onnx", "NASNetMobile", (224, 224), "tf", "NHWC",
                                        opset=15, optional="extra"),
    # Keras 3's own model.export(format="onnx") (tf2onnx underneath, patched by Keras)
    "keras-mobilenetv2-export": _case("tf", "keras", "keras.export", "MobileNetV2", (224, 224), "tf", "NHWC",
                                      opset=17),
    # PaddlePaddle, paddle2onnx ---------------------------------------------------------------------
    "paddle-resnet18": _case("paddle", "paddle", "paddle2onnx", "resnet18", (224, 224), "imagenet", "NCHW",
                             opset=17),
    "paddle-mobilenet_v3_small": _case("paddle", "paddle", "paddle2onnx", "mobilenet_v3_small", (224, 224),
                                       "imagenet", "NCHW", opset=None),
    "paddle-shufflenet_v2_x0_25": _case("paddle", "paddle", "paddle2onnx", "shufflenet_v2_x0_25", (224, 224),
                                        "imagenet", "NCHW", opset=11, optional="extra"),
    # JAX / Flax NNX, jax2onnx ----------------------------------------------------------------------
    "flax-cnn-jax2onnx": _case("jax", "flax", "jax2onnx", "cnn", (64, 64), "imagenet", "NHWC", opset=None),
    # jax.lax.scan over each row of a feature map: a Loop node (converters/control_flow.py)
    "flax-scanrnn-jax2onnx": _case("jax", "flax", "jax2onnx", "scanrnn", (32, 32), "imagenet", "NHWC", opset=None),
    "flax-vit-jax2onnx": _case("jax", "flax", "jax2onnx", "vit", (32, 32), "tf", "NHWC", opset=None,
                               optional="extra"),
}

# Hugging Face transformers (built from configurations, no hub), both torch exporters, each family at
# two sizes: a small one (ViT, ConvNeXt and Swin shrunk: the same layer types, fewer and narrower
# blocks; the smallest published MobileViT and ResNet, xx-small and resnet-18) with both exporters, and
# the published checkpoints' configurations (ViT-base, ConvNeXt-tiny, Swin-tiny, MobileViT-small,
# ResNet-50) with the dynamo exporter. CI's budget leaves out (``optional``: build.py --published,
# pytest -m published) ViT-base (about 2.5 minutes of tests per export) and the legacy exports of the
# published sizes.
_HF = {  # family -> (preprocessing, input size, (default recipe, its name), (published recipe, its name))
    "vit": (HF_HALF, (224, 224), "mini", "base"),
    "convnext": (HF_IMAGENET, (224, 224), "mini", "tiny"),
    "swin": (HF_IMAGENET, (224, 224), "mini", "tiny"),
    "mobilevit": (HF_MOBILEVIT, (256, 256), "xx-small", "small"),
    "resnet": (HF_IMAGENET, (224, 224), "18", "50"),
}
for _family, (_pre, _size, _small, _big) in _HF.items():
    for _variant in (_small, _big):
        for _exporter in ("legacy", "dynamo"):
            _name = f"hf-{_family}{'' if _family == 'resnet' else '-'}{_variant}-{_exporter}"
            CASES[_name] = _case("main", "transformers", f"torch.onnx-{_exporter}", f"{_family}:{_variant}",
                                 _size, _pre, "NCHW",
                                 optional="published" if _variant == _big and (_family == "vit" or _exporter == "legacy")
                                 else None,
                                 opset=17 if _exporter == "legacy" else None)


# more Hugging Face families, one export each
_HF_MORE = {  # name -> (recipe, exporter, preprocessing)
    "hf-mobilenetv2-legacy": ("mobilenetv2:1.0", "legacy", HF_HALF),
    "hf-levit-128S-legacy": ("levit:128S", "legacy", HF_IMAGENET),
    "hf-levit-128S-dynamo": ("levit:128S", "dynamo", HF_IMAGENET),
    "hf-dinov2-small-dynamo": ("dinov2:small", "dynamo", HF_IMAGENET),
    "hf-beit-mini-legacy": ("beit:mini", "legacy", HF_HALF),
}
#: run in CI (the rest of _HF_MORE is the ``extra`` subset): LeViT-128S amplifies float32 rounding (its
#: converted module is 3.7e-4 / 5.5e-4 off onnxruntime, which is itself 2.2e-4 / 6.5e-4 off its node-by-node
#: evaluation), the one cross-framework case of the conversion check's own-spread tolerance
_HF_IN_CI = {"hf-levit-128S-legacy", "hf-levit-128S-dynamo"}
for _name, (_recipe, _exporter, _pre) in _HF_MORE.items():
    CASES[_name] = _case("main", "transformers", f"torch.onnx-{_exporter}", _recipe, (224, 224), _pre, "NCHW",
                         opset=17 if _exporter == "legacy" else None,
                         optional=None if _name in _HF_IN_CI else "extra")


# The ``sweep`` subset: classifiers the other cases do not cover, at their architectures' published
# input sizes, for a compatibility sweep (build.py --sweep, pytest -m sweep; not in CI)
HF_EFFICIENTNET = {"mean": [0.485, 0.456, 0.406], "std": [0.47853944 ** 2, 0.4732864 ** 2, 0.47434163 ** 2],
                   "scale": 1 / 255, "channel_order": "RGB"}  # google/efficientnet-b0: std applied twice
# Not here: Keras's ConvNeXtTiny, whose depthwise Conv2D(groups=C) TensorFlow runs as an XLA-compiled function:
# tf2onnx 1.17 (from_keras and Keras's model.export alike) leaves 18 StatefulPartitionedCall nodes in the file
# ("Tensorflow op ... is not supported" in its log, no error), which no ONNX runtime loads (the library's
# ModelLoadError: "No Op registered for StatefulPartitionedCall"). Keras 3.15 has no RegNet.
_SWEEP_KERAS = {  # name -> (keras.applications model, input size, preprocessing, opset, exporter)
    "keras-xception-tf2onnx": ("Xception", 299, "tf", 17, "tf2onnx"),
    "keras-inceptionv3-tf2onnx": ("InceptionV3", 299, "tf", 17, "tf2onnx"),
    "keras-mobilenetv3small-tf2onnx": ("MobileNetV3Small", 224, "none", 17, "tf2onnx"),
    "keras-resnet50v2-tf2onnx": ("ResNet50V2", 224, "tf", 17, "tf2onnx"),
    "keras-efficientnetv2b1-tf2onnx": ("EfficientNetV2B1", 240, "none", 18, "tf2onnx"),
    "keras-resnet50v2-export": ("ResNet50V2", 224, "tf", 17, "keras.export"),
    "keras-mobilenetv3large-export": ("MobileNetV3Large", 224, "none", 17, "keras.export"),
    "keras-inceptionresnetv2-tf2onnx": ("InceptionResNetV2", 299, "tf", 17, "tf2onnx"),
    "keras-mobilenet-tf2onnx": ("MobileNet", 224, "tf", 13, "tf2onnx"),
}
for _name, (_model, _px, _pre, _opset, _exporter) in _SWEEP_KERAS.items():
    CASES[_name] = _case("tf", "keras", _exporter, _model, (_px, _px), _pre, "NHWC", opset=_opset,
                         optional="sweep")
_SWEEP_PADDLE = {  # paddle.vision.models name -> (input size, opset)
    "mobilenet_v2": (224, 17), "densenet121": (224, 17), "googlenet": (224, 17), "inception_v3": (299, 17),
    "squeezenet1_1": (224, 17), "vgg11": (224, 17), "mobilenet_v1": (224, 17), "resnext50_32x4d": (224, 17),
    "shufflenet_v2_swish": (224, 13), "alexnet": (224, 17),
}
for _model, (_px, _opset) in _SWEEP_PADDLE.items():
    CASES[f"paddle-{_model}"] = _case("paddle", "paddle", "paddle2onnx", _model, (_px, _px), "imagenet", "NCHW",
                                      opset=_opset, optional="sweep")
_SWEEP_HF = {  # name -> (recipe, exporter, preprocessing, input size)
    "hf-dinov2-small-legacy": ("dinov2:small", "legacy", HF_IMAGENET, 224),
    "hf-beit-mini-dynamo": ("beit:mini", "dynamo", HF_HALF, 224),
    "hf-data2vec-vision-mini-legacy": ("data2vec-vision:mini", "legacy", HF_HALF, 224),
    "hf-poolformer-s12-dynamo": ("poolformer:s12", "dynamo", HF_IMAGENET, 224),
    "hf-deit-tiny-distilled-legacy": ("deit:tiny-distilled", "legacy", HF_IMAGENET, 224),
    "hf-efficientnet-b0-legacy": ("efficientnet:b0", "legacy", HF_EFFICIENTNET, 224),
    "hf-regnet-x-002-dynamo": ("regnet:x-002", "dynamo", HF_IMAGENET, 224),
    "hf-bit-50-legacy": ("bit:50", "legacy", HF_HALF, 224),
    "hf-convnextv2-atto-dynamo": ("convnextv2:atto", "dynamo", HF_IMAGENET, 224),
    "hf-focalnet-tiny-legacy": ("focalnet:tiny", "legacy", HF_IMAGENET, 224),
    "hf-pvt-tiny-legacy": ("pvt:tiny", "legacy", HF_IMAGENET, 224),
    "hf-pvtv2-b0-dynamo": ("pvtv2:b0", "dynamo", HF_IMAGENET, 224),
    "hf-swiftformer-xs-legacy": ("swiftformer:xs", "legacy", HF_IMAGENET, 224),
    "hf-hiera-tiny-legacy": ("hiera:tiny", "legacy", HF_IMAGENET, 224),
    "hf-hiera-tiny-dynamo": ("hiera:tiny", "dynamo", HF_IMAGENET, 224),
    "hf-hgnetv2-dynamo": ("hgnetv2:default", "dynamo", HF_IMAGENET, 224),
    "hf-dinov2reg-small-dynamo": ("dinov2reg:small", "dynamo", HF_IMAGENET, 224),
    # the same families with the other exporter
    "hf-data2vec-vision-mini-dynamo": ("data2vec-vision:mini", "dynamo", HF_HALF, 224),
    "hf-poolformer-s12-legacy": ("poolformer:s12", "legacy", HF_IMAGENET, 224),
    "hf-deit-tiny-distilled-dynamo": ("deit:tiny-distilled", "dynamo", HF_IMAGENET, 224),
    "hf-efficientnet-b0-dynamo": ("efficientnet:b0", "dynamo", HF_EFFICIENTNET, 224),
    "hf-regnet-x-002-legacy": ("regnet:x-002", "legacy", HF_IMAGENET, 224),
    "hf-bit-50-dynamo": ("bit:50", "dynamo", HF_HALF, 224),
    "hf-convnextv2-atto-legacy": ("convnextv2:atto", "legacy", HF_IMAGENET, 224),
    "hf-focalnet-tiny-dynamo": ("focalnet:tiny", "dynamo", HF_IMAGENET, 224),
    "hf-pvt-tiny-dynamo": ("pvt:tiny", "dynamo", HF_IMAGENET, 224),
    "hf-pvtv2-b0-legacy": ("pvtv2:b0", "legacy", HF_IMAGENET, 224),
    "hf-swiftformer-xs-dynamo": ("swiftformer:xs", "dynamo", HF_IMAGENET, 224),
}
for _name, (_recipe, _exporter, _pre, _px) in _SWEEP_HF.items():
    CASES[_name] = _case("main", "transformers", f"torch.onnx-{_exporter}", _recipe, (_px, _px), _pre, "NCHW",
                         opset=17 if _exporter == "legacy" else None, optional="sweep")
# MobileViTV2 with the dynamo exporter only: its unfold/fold is aten::col2im, which the legacy exporter
# refuses at opset 17 (Col2Im is opset 18) and fails on at opset 18 (torch 2.14's symbolic_opset18.col2im:
# TypeError: 'NoneType' object is not subscriptable, the output size's shape unknown)
CASES["hf-mobilevitv2-1.0-dynamo"] = _case("main", "transformers", "torch.onnx-dynamo", "mobilevitv2:1.0", (256, 256),
                                           HF_MOBILEVIT, "NCHW", opset=None, optional="sweep")


def cache_root() -> Path:
    """``$EXPORT_CACHE/frameworks`` (default ``~/.cache/onnx-explainer-tests/frameworks``): venvs,
    timings and the versioned case folders."""
    root = Path(os.environ.get("EXPORT_CACHE", Path.home() / ".cache" / "onnx-explainer-tests"))
    return root / "frameworks"


def cases_root() -> Path:
    return cache_root() / f"v{BUILD_VERSION}"


#: the optional subsets: built with build.py --NAME (or FRAMEWORKS_NAME=1), tested with pytest -m NAME
SUBSETS = {
    "published": "the published-size Hugging Face cases that CI's budget leaves out",
    "extra": "more families and exporter options (CI's budget leaves them out)",
    "sweep": "a compatibility sweep over more architectures of every framework (not in CI)",
}


def enabled_subsets() -> set[str]:
    """The optional subsets that FRAMEWORKS_PUBLISHED=1 / FRAMEWORKS_EXTRA=1 switch on."""
    return {s for s in SUBSETS if os.environ.get(f"FRAMEWORKS_{s.upper()}", "") not in ("", "0")}


def selected(subsets=None) -> list[str]:
    """The cases built and tested: the default ones and those of ``subsets`` (default: the enabled ones)."""
    subsets = enabled_subsets() if subsets is None else set(subsets)
    return [name for name, case in CASES.items() if case["optional"] is None or case["optional"] in subsets]
