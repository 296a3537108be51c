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

#: public name -> the module that defines it (None: the module itself). Imported on first use (PEP 562),
#: so that ``import explainer`` and ``explainer --help`` do not pay for torch, onnxruntime and every
#: method (seconds). The methods' functions are not listed here: ``_methods()`` reads them from the
#: methods' files (``explainer.methods.public_names``), so adding a method is adding its file.
_LAZY = {
    "load": "runtime",
    "evaluate": None,
    "get_method": "methods.registry", "list_methods": "methods.registry",
    "gradcam_layers": "runtime.feature_layers",
    "Classifier": "runtime", "Layer": "runtime", "Prediction": "runtime", "Preprocessing": "model",
    "sample_image": "samples",
    "explain_dataset": "dataset",
    "export_explained": "export",
    "imtile": "viz", "mat2gray": "viz", "overlay": "viz", "plot_maps": "viz", "map_figure": "viz",
    "top_k_figure": "viz",
}


def _methods() -> dict:
    from .methods import public_names

    return public_names()


def __getattr__(name: str):
    import importlib
    import importlib.util

    if name == "__all__":
        globals()["__all__"] = _all()
        return globals()["__all__"]
    module = _LAZY[name] if name in _LAZY else _methods().get(name, False)
    if module is False:
        # a subpackage or module (explainer.dataset, explainer.model, ...), imported on first use too
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f".{name}", __name__)
        raise AttributeError(f"module 'explainer' has no attribute {name!r}")
    value = importlib.import_module(f".{module or name}", __name__)
    if module is not None:
        value = getattr(value, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_methods()) | {"__all__"})


from .version import __version__  # noqa: E402


def _all() -> list[str]:
    """``__all__``, made on first use: the names above, then the methods' functions."""
    return ["load", "list_methods", "get_method", "explain_dataset", *_methods(), "gradcam_layers",
            "sample_image", "plot_maps", "map_figure", "top_k_figure", "imtile", "mat2gray", "overlay", "evaluate",
            "Classifier", "Layer", "Prediction", "Preprocessing", "ExplainerError", "errors", "limits"]
