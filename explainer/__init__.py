"""onnx-explainer: why did an ONNX image classifier say that?

    >>> import explainer
    >>> net = explainer.load()                  # the embedded EfficientNet-Lite0
    >>> net.top_k("cat.jpg", 3)
"""
from __future__ import annotations

from . import errors, evaluate, limits
from .errors import ExplainerError
from .methods.deepdream import deep_dream_image
from .methods.gradcam import gradcam, gradcam_layers
from .methods.gradcam_plus_plus import gradcam_plus_plus
from .methods.gradients import gradient_attribution
from .methods.guided_backprop import guided_backprop
from .methods.integrated_gradients import integrated_gradients
from .methods.kernel_shap import kernel_shap, kernel_shap_explanation
from .methods.lime import image_lime, lime_explanation
from .methods.occlusion import occlusion_sensitivity
from .methods.registry import get_method, list_methods
from .methods.rise import rise
from .methods.saliency import saliency
from .methods.score_cam import score_cam
from .methods.smoothgrad import smoothgrad
from .model import Classifier, Layer, Prediction, Preprocessing
from .samples import sample_image
from .viz import imtile, mat2gray, overlay, plot_maps

__version__ = "0.1.0"


def load(source=None, *, preprocessing=None, labels=None, input_layout=None, device="auto",
         batch_size="auto", allow_external_data=True, torch_device="auto") -> Classifier:
    """Load an ONNX image classifier.

    source: a path, bytes, an ``onnx.ModelProto``, a registry name (``explainer.zoo.registry.REGISTRY``)
    or None for the embedded default (EfficientNet-Lite0). Weights in files beside the model (the dynamo
    exporter's ``NAME.onnx.data``) are read from the model's folder; ``allow_external_data=False``
    refuses them. Everything the graph tells (input name,
    layout, size, channels, dtype, softmax, labels and preprocessing in ``metadata_props``) is read
    from it; the arguments override. ``device`` picks onnxruntime's execution provider (forward
    methods); ``torch_device`` the device of the converted module (gradient methods, ``backend="torch"``).
    """
    from .model.load import load_model

    loaded = load_model(source, allow_external_data=allow_external_data)
    return Classifier(loaded, preprocessing=preprocessing, labels=labels, input_layout=input_layout,
                      device=device, batch_size=batch_size, torch_device=torch_device)


__all__ = ["load", "list_methods", "get_method",
           "occlusion_sensitivity", "image_lime", "lime_explanation", "rise", "kernel_shap",
           "kernel_shap_explanation", "score_cam",
           "gradcam", "gradcam_plus_plus", "gradcam_layers", "gradient_attribution", "saliency", "guided_backprop",
           "integrated_gradients", "smoothgrad", "deep_dream_image",
           "sample_image", "plot_maps", "imtile", "mat2gray", "overlay", "evaluate",
           "Classifier", "Layer", "Prediction", "Preprocessing", "ExplainerError", "errors", "limits"]
