"""A request's body → its fields and the image's bytes.

Both endpoints that take an image accept it two ways, with the same other fields: a multipart form
(``image`` a file, or base64 text; the other fields text, ``options`` as JSON text), or a JSON body
(``image`` base64, checked against the endpoint's pydantic model). Anything else is a ``BadRequest``
(400, or 415 for another content type), with a message that says what to send.
"""
from __future__ import annotations

import json

from fastapi import Request
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from .. import errors
from .images import from_base64
from .settings import Settings


class BadRequest(errors.ExplainerError):
    """A request the service cannot read (no image, not JSON, wrong content type)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


async def read_request(request: Request, model) -> tuple[dict, bytes]:
    """The request's fields and image bytes, from a multipart form (``image`` a file, or base64 text) or
    a JSON body (``image`` base64)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data" or kind == "application/x-www-form-urlencoded":
        try:
            form = await request.form(max_files=1, max_fields=32)
        except HTTPException as exc:
            raise BadRequest(f"cannot read the form: {exc.detail}") from None
        fields = {k: v for k, v in form.items() if k != "image"}
        unknown = sorted(set(fields) - set(model.model_fields))
        if unknown:
            raise errors.InvalidParameterError(f"{unknown[0]}: not a field of this endpoint; its fields are "
                                               f"{', '.join(model.model_fields)}.")
        image = form.get("image")
        if image is None:
            raise BadRequest("image: the form has no 'image' field (a file, or base64 text).")
        data = await image.read() if hasattr(image, "read") else from_base64(image)
        if any(hasattr(v, "read") for v in fields.values()):
            raise BadRequest("only the 'image' field may be a file.")
        return fields, data
    if kind == "application/json":
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"the body is not valid JSON ({exc}).") from None
        try:
            parsed = model.model_validate(body)
        except ValidationError as exc:
            raise errors.InvalidParameterError(pydantic_message(exc.errors())) from None
        fields = parsed.model_dump(exclude={"image"}, exclude_unset=True)
        return fields, from_base64(parsed.image)
    raise BadRequest("send the image as multipart/form-data (field 'image') or as JSON with base64 'image'; "
                     f"got content type {kind or 'none'!r}.", 415)


def requested_time_limit(request: Request, settings: Settings) -> float:
    """The service's time limit, or the shorter one a client asks for with ``X-Time-Limit: SECONDS``
    (a client that will stop waiting after that long thus frees its worker too)."""
    asked = request.headers.get("x-time-limit")
    if asked is None:
        return settings.time_limit
    try:
        seconds = float(asked)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds <= settings.time_limit:
        raise errors.InvalidParameterError(f"X-Time-Limit: must be a number of seconds in "
                                           f"(0, {settings.time_limit:g}]; got {asked!r}.")
    return seconds


def json_field(name: str, value):
    """A field that holds JSON: parsed when it came as form text."""
    if isinstance(value, str):
        try:
            return json.loads(value) if value.strip() else None
        except ValueError as exc:
            raise errors.InvalidParameterError(f"{name}: not valid JSON ({exc}).") from None
    return value


def pydantic_message(problems) -> str:
    parts = []
    for p in problems[:5]:
        where = ".".join(str(x) for x in p.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {p.get('msg', 'invalid')}")
    return "; ".join(parts) + "."
