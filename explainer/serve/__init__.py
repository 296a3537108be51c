"""``explainer serve``: the library as an HTTP service with an interactive page.

The service meets the methods where every other way in does, at the registry: ``GET /v1/methods`` is
``list_methods()``, ``POST /v1/explain`` calls ``get_method(name)(net, image, labels, **options)``. The
modules, one concept each:

* ``settings``: the service's limits (workers, queue, time limit, body and image size, token);
* ``pool``: the bounded worker pool (admission, time limit, cancellation, drain);
* ``progress``: how a running job is observed (progress) and stopped (cancellation);
* ``images``: uploads and base64 bytes → canonical pixels, safely;
* ``reading``: a request's body (multipart form or JSON) → its fields and the image's bytes;
* ``params``: request fields → methods, labels and options, with the service's policy;
* ``work``: what runs in the pool (classify, explain) and how maps are encoded;
* ``middleware``: token, body size limit, structured access log;
* ``app``: ``create_app(net, settings)``, the FastAPI application; ``cli``: ``explainer serve``.

FastAPI is imported only by ``app`` (``pip install 'onnx-explainer[serve]'``), so ``explainer --help``
and ``import explainer`` never pay for it.
"""
from __future__ import annotations


def __getattr__(name):
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "Settings":
        from .settings import Settings

        return Settings
    raise AttributeError(name)


__all__ = ["create_app", "Settings"]
