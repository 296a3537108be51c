"""The one exception hierarchy of the library: every user-facing failure is an ``ExplainerError``.

Subclasses also derive from the builtin exception a caller would naturally catch (``ValueError`` for
bad values, ``TypeError`` for bad types), so ``except ValueError`` keeps working.
"""
from __future__ import annotations


class ExplainerError(Exception):
    """Base class of every error raised on purpose by onnx-explainer."""


class ModelLoadError(ExplainerError, ValueError):
    """The model file or bytes could not be read as a safe, valid ONNX model."""


class UnsupportedModelError(ExplainerError, ValueError):
    """The model is valid ONNX but cannot be used as an image classifier."""


class ConversionError(ExplainerError, RuntimeError):
    """The ONNX graph could not be turned into a PyTorch module that matches onnxruntime."""


class InvalidImageError(ExplainerError, ValueError):
    """An image could not be read or is outside what the library accepts."""


class InvalidParameterError(ExplainerError, ValueError):
    """A parameter is outside its allowed values."""


class InvalidParameterTypeError(ExplainerError, TypeError):
    """A parameter has the wrong type."""


class UnknownLayerError(InvalidParameterError):
    """A layer (node or tensor) name that is not in the graph."""


class LayerNotFeatureMapError(InvalidParameterError):
    """A layer that cannot be read as a feature map of the image: attention, a tensor the image does not
    reach, or activations with no place in the image."""


class DegenerateMapError(ExplainerError, ArithmeticError):
    """A method's map carries no signal (zero everywhere, or at float32 noise level): returning it would
    be a silent wrong answer; the message names the layer or setting to change."""


class UnknownClassError(InvalidParameterError):
    """A class name or index that the classifier does not have."""


class ResourceLimitError(ExplainerError):
    """An input exceeds a configured limit (file size, pixels, memory budget). Raised too for an
    allocation that failed inside onnxruntime or torch; such errors carry ``allocation_failed = True``."""

    allocation_failed = False


class NonFiniteOutputError(ExplainerError, FloatingPointError):
    """The model produced NaN or infinite scores; no map is computed from them."""


class DeviceError(ExplainerError, RuntimeError):
    """The requested device or execution provider is not available."""


class DownloadError(ExplainerError, OSError):
    """A registry model could not be downloaded or failed its checksum."""


class CacheError(ExplainerError, OSError):
    """The cache folder cannot be written (disk full, read-only, no permission)."""


class UnsupportedHeadOpError(UnsupportedModelError):
    """``export_explained``: the head (feature layer → scores) holds an op that no gradient rule covers,
    or covers only in part; the message names the op, the node and the way out (``recipro_cam``)."""


class ExportWriteError(ExplainerError, OSError):
    """``export_explained``: the model cannot be written where asked (a folder, a missing or read-only
    folder, a full disk); nothing is left half-written."""

class HeadSplitError(InvalidParameterError):
    """``recipro_cam``: the scores depend on the image other than through the feature layer (and tensors
    masked with it): the graph cannot be split there into a backbone and a head; the message names the
    nearest layer that can."""


class ExplainerWarning(UserWarning):
    """Base class of the warnings onnx-explainer gives."""


class BatchFallbackWarning(ExplainerWarning):
    """The model runs one image at a time: its graph keeps the batch it was exported with."""


class OptimisationFallbackWarning(ExplainerWarning):
    """onnxruntime's graph optimisations changed the model's scores: it runs with fewer (or none)."""

