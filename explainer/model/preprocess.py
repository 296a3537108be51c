"""From canonical pixels (float32 H x W x C, RGB, 0..255) to what the graph's input expects.

``model_input = (pixels * scale - mean) / std`` per channel, in the model's channel order, after an
antialiased bicubic resize to the graph's H x W (like MATLAB's imresize: the kernel widens when
shrinking, so no aliasing). Presets:

=========== ======================================================= ================
name        formula                                                  channel order
=========== ======================================================= ================
imagenet    (x/255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]  RGB
caffe       x - [103.939, 116.779, 123.68]                           BGR
tf          x/127.5 - 1                                              RGB
none        x (0..255; the graph normalises itself)                  RGB
unit        x/255 (0..1; the graph normalises itself from there)     RGB
=========== ======================================================= ================
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from ..errors import InvalidParameterError, InvalidParameterTypeError
from .bicubic import resize_image, resize_maps

CHANNEL_ORDERS = ("RGB", "BGR")
METADATA_KEY = "onnx_explainer.preprocessing"


@dataclass(frozen=True)
class Preprocessing:
    mean: tuple = (0.0, 0.0, 0.0)
    std: tuple = (1.0, 1.0, 1.0)
    scale: float = 1.0
    channel_order: str = "RGB"
    name: str = field(default="custom", compare=False)
    #: where it came from: "argument", "registry", "metadata", or why the default was taken
    origin: str = field(default="argument", compare=False)

    def __post_init__(self):
        for key in ("mean", "std"):
            value = np.atleast_1d(np.asarray(getattr(self, key), dtype=np.float64))
            if value.ndim != 1 or len(value) not in (1, 3) or not np.all(np.isfinite(value)):
                raise InvalidParameterError(
                    f"preprocessing: {key} must be one number or three finite numbers; got "
                    f"{getattr(self, key)!r}.")
            object.__setattr__(self, key, tuple(float(v) for v in value))
        if any(s == 0 for s in self.std):
            raise InvalidParameterError(f"preprocessing: std must be non-zero; got {self.std}.")
        if not np.isfinite(self.scale) or self.scale == 0:
            raise InvalidParameterError(f"preprocessing: scale must be a non-zero number; got {self.scale}.")
        if self.channel_order not in CHANNEL_ORDERS:
            raise InvalidParameterError(
                f"preprocessing: channel_order must be one of {CHANNEL_ORDERS}; got {self.channel_order!r}.")

    def normalise(self, pixels: np.ndarray, channels_first: bool = False) -> np.ndarray:
        """Channel order, scale, mean and std on an H x W x C (or N x H x W x C) array; no resizing.
        ``channels_first``: the result laid out C x H x W (N x C x H x W), contiguous, with the same
        values (each channel computed straight into its plane, in float32 pixels' own arithmetic)."""
        x = pixels[..., ::-1] if self.channel_order == "BGR" and pixels.shape[-1] == 3 else pixels
        c = x.shape[-1]
        mean = np.asarray(self.mean[:c] if len(self.mean) == 3 else self.mean * c, dtype=np.float32)
        std = np.asarray(self.std[:c] if len(self.std) == 3 else self.std * c, dtype=np.float32)
        if channels_first and x.dtype == np.float32:
            out = np.empty(x.shape[:-3] + (c,) + x.shape[-3:-1], np.float32)
            for k in range(c):  # one plane at a time: three passes over it, no full-size temporaries
                plane = out[..., k, :, :]
                np.multiply(x[..., k], np.float32(self.scale), out=plane)
                np.subtract(plane, mean[k], out=plane)
                np.divide(plane, std[k], out=plane)
            return out
        out = ((x * np.float32(self.scale) - mean) / std).astype(np.float32, copy=False)
        return np.ascontiguousarray(np.moveaxis(out, -1, -3)) if channels_first else out

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("origin")
        return json.dumps(d)


PRESETS = {
    "imagenet": Preprocessing((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1 / 255, "RGB", "imagenet"),
    "caffe": Preprocessing((103.939, 116.779, 123.68), (1.0,), 1.0, "BGR", "caffe"),
    "tf": Preprocessing((1.0,), (1.0,), 1 / 127.5, "RGB", "tf"),
    "none": Preprocessing((0.0,), (1.0,), 1.0, "RGB", "none"),
    "unit": Preprocessing((0.0,), (1.0,), 1 / 255, "RGB", "unit"),
}


#: ONNX's standard image metadata (docs/MetadataProps.md: what WinMLTools, Custom Vision and other
#: exporters write): the pixel range the input expects, and its channel order
NOMINAL_RANGES = {"NominalRange_0_255": "none", "Normalized_0_1": "unit", "Normalized_1_1": "tf"}
PIXEL_FORMATS = {"Rgb8": "RGB", "Bgr8": "BGR", "Rgba8": "RGB", "Bgra8": "BGR", "Gray8": "RGB"}


def from_image_metadata(metadata: dict) -> Preprocessing | None:
    """The preprocessing ONNX's standard image metadata states (``Image.NominalPixelRange``,
    ``Image.BitmapPixelFormat``), or None where the model carries none."""
    nominal = metadata.get("Image.NominalPixelRange")
    pixel_format = metadata.get("Image.BitmapPixelFormat")
    if nominal is None and pixel_format is None:
        return None
    if nominal is not None and nominal not in NOMINAL_RANGES:
        raise InvalidParameterError(
            f"the model's metadata Image.NominalPixelRange={nominal!r} is not one of {sorted(NOMINAL_RANGES)} "
            "(NominalRange_16_235 is video range, not supported); pass preprocessing= explicitly.")
    if pixel_format is not None and pixel_format not in PIXEL_FORMATS:
        raise InvalidParameterError(
            f"the model's metadata Image.BitmapPixelFormat={pixel_format!r} is not one of "
            f"{sorted(PIXEL_FORMATS)}; pass preprocessing= explicitly.")
    name = NOMINAL_RANGES[nominal or "NominalRange_0_255"]
    order = PIXEL_FORMATS.get(pixel_format or "Rgb8", "RGB")
    return replace(PRESETS[name], channel_order=order, name=name if order == "RGB" else f"{name}-bgr",
                   origin=f"metadata (Image.NominalPixelRange={nominal}, Image.BitmapPixelFormat={pixel_format})")


#: producer_name (lower case, a prefix) -> (the framework, what its image classifiers usually expect)
PRODUCER_CONVENTIONS = (
    ("tf2onnx", "TensorFlow/Keras (tf2onnx)",
     "Keras applications: MobileNet/MobileNetV2/Inception/Xception/NASNet 'tf' (x/127.5 - 1); ResNet50/VGG "
     "'caffe' (BGR, mean subtracted); EfficientNet/EfficientNetV2/ConvNeXt/RegNet normalise inside the "
     "graph ('none'); a model trained with Rescaling(1/255) 'unit'"),
    ("keras", "Keras",
     "as Keras applications: 'tf' for MobileNets/Inception, 'caffe' for ResNet50/VGG, 'none' for "
     "EfficientNet/ConvNeXt (normalised inside); 'unit' after Rescaling(1/255)"),
    ("paddle", "PaddlePaddle (paddle2onnx)",
     "paddle.vision and PaddleClas models: 'imagenet' (x/255, ImageNet mean and std, RGB)"),
    ("jax2onnx", "JAX/Flax (jax2onnx)",
     "no convention: Flax examples train on x/255 ('unit') or ImageNet statistics ('imagenet'); check the "
     "training pipeline"),
    ("pytorch", "PyTorch (torch.onnx)",
     "torchvision, most timm models and Hugging Face ConvNeXt/Swin/ResNet: 'imagenet'; Hugging Face "
     "ViT/BEiT and timm's ViTs trained with mean = std = 0.5: "
     "preprocessing={'mean': (0.5, 0.5, 0.5), 'std': (0.5, 0.5, 0.5), 'scale': 1/255}"),
    ("onnxmltools", "ONNXMLTools", "whatever the source framework's training used"),
)


def producer_hint(producer_name: str, producer_version: str = "") -> str:
    """Which framework wrote the file and what its image classifiers usually expect, for the warning
    given when the preprocessing is guessed."""
    key = (producer_name or "").strip().lower()
    for prefix, framework, expects in PRODUCER_CONVENTIONS:
        if key.startswith(prefix):
            version = f" {producer_version}" if producer_version else ""
            return (f"the file was written by {producer_name}{version} ({framework}), whose image classifiers "
                    f"usually expect: {expects}")
    if key:
        return f"the file was written by {producer_name} {producer_version}".rstrip() + ", a producer with no known convention"
    return "the file does not say which program wrote it (producer_name is empty)"


def resolve(value, metadata: dict | None = None, default="imagenet", given_by: str = "argument") -> Preprocessing:
    """``preprocessing=`` argument → ``Preprocessing``: a preset name, a dict of fields, an instance,
    or None (the graph's metadata, else ``default``: a preset name, or a function giving (preset,
    why)). ``origin`` records which."""
    if value is None:
        if metadata and METADATA_KEY in metadata:
            try:
                spec = json.loads(metadata[METADATA_KEY])
                if not isinstance(spec, dict):
                    raise ValueError(f"a JSON object of fields is needed, not {type(spec).__name__} "
                                     f"{metadata[METADATA_KEY][:80]!r}")
                spec = {k: v for k, v in spec.items() if k != "origin"}
                return Preprocessing(**spec, origin="metadata")
            except (ValueError, TypeError, AttributeError, OverflowError, RecursionError) as exc:
                raise InvalidParameterError(
                    f"the model's metadata {METADATA_KEY!r} is not a valid preprocessing spec ({exc}); "
                    "pass preprocessing= explicitly.") from None
        standard = from_image_metadata(metadata or {})
        if standard is not None:
            return standard
        name, why = default() if callable(default) else (default, "default")
        return replace(PRESETS[name], origin=why)
    if isinstance(value, Preprocessing):
        return value
    if isinstance(value, str):
        if value not in PRESETS:
            raise InvalidParameterError(
                f"load: preprocessing must be one of {sorted(PRESETS)}, a dict or a Preprocessing; "
                f"got {value!r}.")
        return replace(PRESETS[value], origin=given_by)
    if isinstance(value, dict):
        allowed = {"mean", "std", "scale", "channel_order", "name"}
        unknown = set(value) - allowed
        if unknown:
            raise InvalidParameterError(
                f"load: preprocessing dict has unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}.")
        return Preprocessing(**value, origin=given_by)
    raise InvalidParameterTypeError(
        f"load: preprocessing must be a preset name, a dict or a Preprocessing; got {type(value).__name__}.")


def resize(pixels: np.ndarray, size: tuple[int, int], clip: bool = True) -> np.ndarray:
    """Antialiased bicubic resize of an H x W x C float image to ``size`` = (height, width): PIL's
    ``Image.resize(..., BICUBIC)`` on each channel as a float image, computed on PIL's coefficients
    (``bicubic.py``); pixels (``clip=True``) stay in 0..255 despite bicubic overshoot, maps
    (``clip=False``) are left as they are."""
    h, w = size
    if pixels.shape[:2] == (h, w):
        return pixels
    out = resize_image(pixels, (h, w))
    return np.clip(out, 0.0, 255.0, out=out) if clip else out


def resize_map(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bicubic resize of float maps (K, h, w) to (K, H, W), unclipped: ``resize`` of each map."""
    if m.shape[-2:] == tuple(size):
        return m.astype(np.float32)
    return resize_maps(m, tuple(size))


def match_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """Gray images are repeated to 3 channels; colour images become gray (ITU-R BT.601) for 1-channel
    models."""
    have = pixels.shape[-1]
    if have == channels:
        return pixels
    if channels == 3:
        return np.repeat(pixels, 3, axis=-1)
    weights = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
    return (pixels @ weights)[..., None].astype(np.float32)
