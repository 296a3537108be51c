"""MATLAB's ``gradientAttribution`` entry point over the gradient methods.

Each gradient method is its own file and registered method: ``saliency.py`` ("gradient", MATLAB's
"autodiff"), ``guided_backprop.py``, ``integrated_gradients.py`` and ``smoothgrad.py``; what they share
is ``_gradients.py``. ``gradient_attribution(method=...)`` and ``pixel_attributions`` dispatch to them;
their options are the union of the four methods' options, with the methods' defaults: their signature is
built once from the declarations (``DISPATCH``), so that each default lives in its method's signature.
"""
from __future__ import annotations

import functools
import importlib
import inspect
from typing import TYPE_CHECKING

import numpy as np

from ..runtime.torch_engine import torch_engine
from ..validation import check_choice
from . import guided_backprop, integrated_gradients, saliency, smoothgrad
from ._common import one_image
from .registry import public

if TYPE_CHECKING:
    from ..runtime.classifier import Classifier

#: MATLAB's method names (``gradientAttribution``'s "autodiff" and "guided-backprop") → registered methods
METHODS = {"autodiff": saliency.saliency, "guided-backprop": guided_backprop.guided_backprop,
           "integrated-gradients": integrated_gradients.integrated_gradients, "smoothgrad": smoothgrad.smoothgrad}


def _union_signature(**overrides) -> inspect.Signature:
    """(net, image, label, *, method="autodiff", then every option of the four methods with its
    method's default): the options of one method first, those several share (batch_size, verbose) last."""
    declared = [fn.method.options for fn in METHODS.values()]
    shared = {name for name in set().union(*declared) if sum(name in d for d in declared) > 1}
    union = {name: option.default for d in declared for name, option in d.items() if name not in shared}
    union.update({name: option.default for d in declared for name, option in d.items() if name in shared})
    union = {"method": "autodiff", **union, **overrides}
    head = list(inspect.signature(saliency.saliency).parameters.values())  # net, image, label
    return inspect.Signature(head + [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
                                     for name, default in union.items()])


def dispatcher(**overrides):
    """Gives ``fn(net, image, label, **options)`` the union's signature (``overrides``: defaults of its
    own); ``fn`` receives every option, defaults filled in, as the signature binds them."""
    signature = _union_signature(**overrides)

    def wrap(fn):
        @functools.wraps(fn)
        def bound(*args, **kwargs):
            call = signature.bind(*args, **kwargs)
            call.apply_defaults()
            return fn(*call.args, **call.kwargs)

        bound.__signature__ = signature
        return bound

    return wrap


def _dispatch(method: str, options: dict, where: str):
    """(the registered method, the options it takes), every given option validated, also those the
    chosen method does not use."""
    check_choice(where, "method", method, tuple(METHODS))
    target = METHODS[method].method
    declared = {}
    for fn in METHODS.values():
        declared.update(fn.method.options)
    for name, value in options.items():
        declared[name].check(where, value)
    return target, {k: v for k, v in options.items() if k in target.options}


@public
@dispatcher()
def gradient_attribution(net: Classifier, image, label, *, method, **options):
    """Pixel attribution map(s): (H, W) for one label, (K, H, W) for several, at the image's size;
    values are the sum over channels of |attribution|, rescaled to [0, 1] per map.

    method: "autodiff" (d score / d pixel; score = class score before any softmax),
    "guided-backprop" (ReLUs pass back only positive gradients), "integrated-gradients" (``steps``,
    ``rule``, ``baseline``: a pixel value or an image, default black), "smoothgrad" (``samples``
    noisy copies, noise std ``noise_level`` x 255, ``random_state`` for reproducibility). The same as
    the registered methods "gradient", "guided_backprop", "integrated_gradients" and "smoothgrad".
    """
    target, options = _dispatch(method, options, "gradient_attribution")
    return target(net, image, label, **options)


@dispatcher(verbose=False)
def pixel_attributions(net: Classifier, image, label, *, method, **options):
    """Raw attributions (K, C, H, W) float32 for one image (H x W its own size; C its channels)."""
    where = "pixel_attributions"
    target, options = _dispatch(method, options, where)
    options = target.validate(net, options, where)
    pixels, indices = one_image(net, image, label, where)
    engine = torch_engine(net)
    raw = importlib.import_module(target.function.__module__).raw
    x = engine.tensor(pixels).permute(2, 0, 1)[None]
    return raw(engine, x, indices, **options).cpu().numpy().astype(np.float32)
