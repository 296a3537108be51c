"""onnx-explainer: why did an ONNX image classifier say that?

    >>> import explainer
    >>> net = explainer.load()                  # the embedded EfficientNet-Lite0
    >>> net.top_k("cat.jpg", 3)
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from . import errors, limits, threads
from .errors import ExplainerError

threads.prefer_passive_openmp()  # before anything imports torch: see explainer/threads.py

if TYPE_CHECKING:
    from .runtime import Classifier

#: public name -> the module that defines it. Imported on first use (PEP 562), so that ``import
#: explainer`` and ``explainer --help`` do not pay for torch, onnxruntime and every method (seconds).
_LAZY = {
    "load": "runtime",
    "evaluate": None,
    "attention_rollout": "methods.attention_rollout",
    "transformer_attribution": "methods.transformer_attribution",
    "attn_lrp": "methods.attn_lrp",
    "deep_dream_image": "methods.deepdream",
    "gradcam": "methods.gradcam", "gradcam_layers": "methods.gradcam",
    "gradcam_plus_plus": "methods.gradcam_plus_plus",
    "gradient_attribution": "methods.gradients",
    "guided_backprop": "methods.guided_backprop",
    "integrated_gradients": "methods.integrated_gradients",
    "kernel_shap": "methods.kernel_shap", "kernel_shap_explanation": "methods.kernel_shap",
    "image_lime": "methods.lime", "lime_explanation": "methods.lime",
    "occlusion_sensitivity": "methods.occlusion",
    "get_method": "methods.registry", "list_methods": "methods.registry",
    "rise": "methods.rise",
    "random_map": "methods.random_map",
    "saliency": "methods.saliency",
    "score_cam": "methods.score_cam",
    "smoothgrad": "methods.smoothgrad",
    "Classifier": "runtime", "Layer": "runtime", "Prediction": "runtime", "Preprocessing": "model",
    "sample_image": "samples",
    "explain_dataset": "dataset",
    "export_explained": "export",
    "imtile": "viz", "mat2gray": "viz", "overlay": "viz", "plot_maps": "viz", "map_figure": "viz",
    "top_k_figure": "viz",
}


def __getattr__(name: str):
    import importlib
    import importlib.util

    if name not in _LAZY:
        # a subpackage or module (explainer.dataset, explainer.model, ...), imported on first use too
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f".{name}", __name__)
        raise AttributeError(f"module 'explainer' has no attribute {name!r}")
    module = _LAZY[name]
    value = importlib.import_module(f".{module or name}", __name__)
    if module is not None:
        value = getattr(value, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


from .version import __version__  # noqa: E402


__all__ = ["load", "list_methods", "get_method", "explain_dataset",
           "occlusion_sensitivity", "image_lime", "lime_explanation", "rise", "kernel_shap",
           "kernel_shap_explanation", "score_cam",
           "gradcam", "gradcam_plus_plus", "gradcam_layers", "gradient_attribution", "saliency", "guided_backprop",
           "integrated_gradients", "smoothgrad", "attention_rollout", "transformer_attribution",
           "attn_lrp",
           "random_map", "deep_dream_image",
           "sample_image", "plot_maps", "map_figure", "top_k_figure", "imtile", "mat2gray", "overlay", "evaluate",
           "Classifier", "Layer", "Prediction", "Preprocessing", "ExplainerError", "errors", "limits"]
