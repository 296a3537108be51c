"""``create_app(net, settings)``: the FastAPI application of ``explainer serve``.

Routes are thin: read the request (multipart upload or JSON with base64), parse it with ``params``
before anything is queued, run the work in the ``WorkPool``, answer JSON. Errors have one format,
``{"error": {"type", "message", "status"}}``: the library's typed errors become 4xx with their message
(``ERROR_STATUS``), overload and time limits 503 (with Retry-After when waiting would help), and
anything else a logged 500, which no test may see.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from .. import errors
from .middleware import AccessLog, BodyLimit, TokenAuth
from .params import (describe_methods, parse_alpha, parse_cmap, parse_k, parse_labels, parse_methods,
                     parse_options, parse_outputs)
from .pool import Overloaded, TimeLimitExceeded, WorkPool
from .reading import BadRequest, json_field, pydantic_message, read_request, requested_time_limit
from .schemas import (ClassifyRequest, ClassifyResponse, ErrorResponse, ExplainRequest, ExplainResponse,
                      multipart_schema)
from . import work
from .settings import Settings

if TYPE_CHECKING:
    from ..runtime.classifier import Classifier

STATIC = Path(__file__).with_name("static")
log = logging.getLogger("explainer.serve")

#: the HTTP status of the library's typed errors that are not 422 (the most specific class listed wins):
#: every other ExplainerError is 422, the request was understood and its content refused (a bad value,
#: an unknown name, an unreadable image, a model a method cannot handle)
ERROR_STATUS = {errors.ResourceLimitError: 413, errors.CacheError: 503, errors.DeviceError: 503}
_ERRORS = {404: "NotFound", 405: "MethodNotAllowed", 415: "UnsupportedMediaType", 400: "BadRequest"}


def error(status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message, "status": status}}, status, headers=headers)


def status_of(exc: errors.ExplainerError) -> int:
    if isinstance(exc, BadRequest):
        return exc.status
    for cls in type(exc).__mro__:
        if cls in ERROR_STATUS:
            return ERROR_STATUS[cls]
    return 422


def create_app(net: Classifier, settings: Settings | None = None, *, warmup: bool = True,
               explained=None) -> FastAPI:
    """The service for ``net`` (an ``explainer.load()`` classifier) under ``settings``' limits.
    ``warmup``: measure batch sizes and list layers before serving, so no request pays for it.
    ``explained``: a file written by ``explainer export`` from ``net``'s model (a path, or an
    ``explainer.export.explained.ExplainedModel``): explain requests for its method at its layer are
    answered by one run of it (``--model-explained``); a ``net`` loaded from such a file uses it
    without being told (the classifier is then the source graph inside it)."""
    from ..export.explained import as_explained, split

    settings = settings or Settings()
    net, inside = split(net)
    explained = as_explained(explained, net) or inside
    pool = WorkPool(settings.workers, settings.queue)
    lane = work.TorchLane()

    @asynccontextmanager
    async def lifespan(app):
        if warmup:
            await asyncio.to_thread(_warm, net)
        log.info("serving model %r: %d workers, %d more may wait, time limit %g s", net.name,
                 settings.workers, settings.queue, settings.time_limit)
        yield
        await pool.close(grace=settings.time_limit)

    app = FastAPI(title="onnx-explainer", version=_version(), lifespan=lifespan,
                  description="Explanations of an ONNX image classifier's predictions: classify, then "
                              "Grad-CAM, occlusion, LIME, gradients... on any uploaded image. The page at "
                              "/ does it interactively.",
                  responses={422: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
    app.state.net, app.state.settings, app.state.pool = net, settings, pool
    app.state.explained = explained

    # errors ---------------------------------------------------------------------------------------
    @app.exception_handler(errors.ExplainerError)
    async def on_typed_error(request, exc):
        return error(status_of(exc), type(exc).__name__, str(exc))

    @app.exception_handler(Overloaded)
    async def on_overloaded(request, exc):
        return error(503, "ServiceUnavailable", str(exc), {"Retry-After": str(exc.retry_after)})

    @app.exception_handler(TimeLimitExceeded)
    async def on_time_limit(request, exc):
        headers = {} if exc.started else {"Retry-After": str(pool.retry_after())}
        return error(503, "TimeLimitExceeded", str(exc), headers)

    @app.exception_handler(HTTPException)
    async def on_http_error(request, exc):
        return error(exc.status_code, _ERRORS.get(exc.status_code, "HTTPError"), str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, exc):
        return error(422, "InvalidParameterError", pydantic_message(exc.errors()))

    @app.exception_handler(Exception)
    async def on_unexpected_error(request, exc):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error(500, "InternalServerError", "an unexpected error; the service's log has the details")

    # routes ---------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/healthz", tags=["service"])
    async def healthz():
        """200 while the service takes requests; 503 once it is shutting down."""
        body = {"status": "closing" if pool.closing else "ok", "model": net.name, "pool": pool.status()}
        return JSONResponse(body, 503 if pool.closing else 200)

    @app.get("/v1/model", tags=["model"])
    async def model():
        """The model: its input, classes and preprocessing, and the service's limits."""
        spec, pre = net.input, net.preprocessing
        return {"name": net.name, "sha256": net.sha256, "device": net.device, "engine": net.engine,
                "precision": net.precision,
                "input": {"name": spec.name, "layout": spec.layout, "height": spec.height, "width": spec.width,
                          "channels": spec.channels, "dtype": np.dtype(spec.dtype).name},
                "classes": {"count": net.num_classes, "names": list(net.class_names)},
                "output": {"probabilities": bool(net.output.is_probability)},
                "preprocessing": {"name": pre.name, "origin": pre.origin, "mean": list(pre.mean),
                                  "std": list(pre.std), "scale": pre.scale, "channel_order": pre.channel_order},
                "explained": explained.describe() if explained is not None else None,
                "limits": settings.as_dict()}

    @app.get("/v1/methods", tags=["model"])
    async def methods():
        """Every explanation method of the registry: kind, what it answers, options with defaults."""
        return {"methods": describe_methods(settings.max_option_value)}

    @app.post("/v1/classify", tags=["explain"], response_model=ClassifyResponse,
              openapi_extra={"requestBody": {"required": True, "content": {
                  **multipart_schema({"k": "how many classes (default 5)"}),
                  "application/json": {"schema": ClassifyRequest.model_json_schema()}}}})
    async def classify(request: Request):
        """The image's top-k classes (``net.top_k``)."""
        fields, data = await read_request(request, ClassifyRequest)
        k = parse_k(fields.get("k", 5), net.num_classes)
        result = await pool.run(lambda job: work.classify(net, data, k, settings.max_pixels, job),
                                timeout=requested_time_limit(request, settings), job_id=request.state.request_id,
                                label="classify")
        return {"model": net.name, **result}

    @app.post("/v1/explain", tags=["explain"], response_model=ExplainResponse, response_model_exclude_none=True,
              openapi_extra={"requestBody": {"required": True, "content": {
                  **multipart_schema({"methods": "comma-separated method names", "labels": "topK, or "
                                      "comma-separated class indices or names", "options": 'JSON: {"method": '
                                      '{"option": value}}', "outputs": "comma-separated: maps, overlays, heatmaps",
                                      "alpha": "overlay opacity", "cmap": "colormap"}),
                  "application/json": {"schema": ExplainRequest.model_json_schema()}}}})
    async def explain(request: Request):
        """Maps of one or more methods for one or more classes of the image, with timings."""
        fields, data = await read_request(request, ExplainRequest)
        methods = parse_methods(fields.get("methods", "gradcam"))
        spec = work.ExplainJob(
            data, methods, parse_labels(fields.get("labels"), settings.max_labels, net),
            parse_options(json_field("options", fields.get("options")), methods, settings.max_option_value),
            parse_outputs(fields.get("outputs")), parse_alpha(fields.get("alpha", 0.5)),
            parse_cmap(fields.get("cmap", "jet")))
        result = await pool.run(lambda job: work.explain(net, spec, settings.max_pixels, job, lane,
                                                         settings.max_output_pixels, explained),
                                timeout=requested_time_limit(request, settings), job_id=request.state.request_id,
                                label="explain")
        return {"model": net.name, **result}

    @app.get("/v1/progress/{request_id}", tags=["explain"])
    async def progress(request_id: str):
        """How far the request sent with ``X-Request-Id: request_id`` got: its stage (a method's name) and
        the steps done of its total; 404 once it has ended (or before it started)."""
        job = pool.job(request_id)
        if job is None:
            return error(404, "NotFound", f"no request {request_id!r} is running or waiting")
        return job.as_dict()

    @app.get("/v1/colourbar", tags=["model"], response_class=Response,
             responses={200: {"content": {"image/png": {}}}})
    async def colourbar(cmap: str = "jet", height: int = 256):
        """The colormap as a vertical PNG bar, the maximum at the top (the maps' colour key)."""
        from ..viz import overlay

        cmap = parse_cmap(cmap)
        if not 2 <= height <= 2048:
            raise errors.InvalidParameterError(f"height: must be in [2, 2048]; got {height}.")
        ramp = np.repeat(np.linspace(1.0, 0.0, height, dtype=np.float32)[:, None], 12, axis=1)
        rgb = overlay(np.zeros((height, 12, 3), np.uint8), ramp, alpha=1.0, cmap=cmap)
        return Response(work.png_bytes(rgb), media_type="image/png",
                        headers={"Cache-Control": "max-age=3600"})

    return _wrap(app, settings)


def _wrap(app: FastAPI, settings: Settings):
    """The app inside its middleware: access log (outermost), token, body limit. Middleware added with
    ``add_middleware`` runs outside FastAPI's error handling, as these must."""
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, timeout=settings.time_limit)
    app.add_middleware(TokenAuth, token=settings.token)
    app.add_middleware(AccessLog)
    return app


def _warm(net: Classifier) -> None:
    """Batch sizes measured, layers listed, one forward pass made: before the first request."""
    net.batch_size, net.stream_batch_size, net.layers()
    net.predict(np.full((*net.input_size, 3), 128, np.uint8))


def _version() -> str:
    from ..version import __version__

    return __version__
