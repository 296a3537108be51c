"""The service's outer layers, as plain ASGI middleware (outermost first): a structured access log, the
bearer token, and the body size limit.

They run before FastAPI parses anything, so a request without the token, or with a body over the limit,
costs neither parsing nor a worker: the token is checked from the headers, and the body is read, up to
``max_body_bytes`` and within the time limit, before the application sees it (413 past the size, 408
for a client that sends too slowly).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from datetime import datetime, timezone

access_log = logging.getLogger("explainer.serve.access")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


async def send_error(send, status: int, kind: str, message: str, headers: dict | None = None) -> None:
    """A JSON error response in the service's one error format."""
    body = json.dumps({"error": {"type": kind, "message": message, "status": status}}).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    head += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


class AccessLog:
    """One JSON line per request on the ``explainer.serve.access`` logger: time, client, method, path,
    status, bytes in and out, duration, request id (``X-Request-Id`` if the client sent a valid one,
    else a new one; echoed in the response)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = _header(scope, b"x-request-id")
        request_id = given if given and _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        start, record = time.perf_counter(), {"status": None, "bytes_out": 0, "bytes_in": 0}

        async def counting_receive():
            message = await receive()
            record["bytes_in"] += len(message.get("body", b""))
            return message

        async def logging_send(message):
            if message["type"] == "http.response.start":
                record["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", request_id.encode())]}
            elif message["type"] == "http.response.body":
                record["bytes_out"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, logging_send)
        except BaseException:
            record["status"] = record["status"] or 500
            raise
        finally:
            client = scope.get("client") or ("", 0)
            access_log.info(json.dumps({
                "ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "event": "access",
                "client": f"{client[0]}:{client[1]}", "method": scope["method"], "path": scope["path"],
                "status": record["status"] or 499, "bytes_in": record["bytes_in"], "bytes_out": record["bytes_out"],
                "duration_ms": round(1000 * (time.perf_counter() - start), 1), "request_id": request_id,
                "user_agent": (_header(scope, b"user-agent") or "")[:200]}))


class TokenAuth:
    """With a token, every path under ``protected`` needs ``Authorization: Bearer <token>`` (401
    otherwise; compared in constant time). The page, its files, /healthz and the API docs stay open:
    they hold no model answers, and the page asks for the token."""

    def __init__(self, app, token: str | None, protected: tuple[str, ...] = ("/v1/",)):
        self.app, self.token, self.protected = app, token, protected

    async def __call__(self, scope, receive, send):
        if self.token is not None and scope["type"] == "http" and scope["path"].startswith(self.protected):
            given = _header(scope, b"authorization") or ""
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self.token.encode()):
                return await send_error(send, 401, "Unauthorized",
                                        "this service needs a token: send 'Authorization: Bearer <token>'"
                                        if not given else "the token is not this service's",
                                        {"WWW-Authenticate": 'Bearer realm="explainer"'})
        return await self.app(scope, receive, send)


class BodyLimit:
    """Reads the whole body before the application (at most ``max_bytes``, within ``timeout`` seconds)
    and replays it: 413 for a declared or actual size over the limit, 408 for a body that does not
    arrive in time."""

    def __init__(self, app, max_bytes: int, timeout: float):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await send_error(send, 413, "PayloadTooLarge", self._message(declared))
        try:
            body = await asyncio.wait_for(self._read(receive), self.timeout)
        except asyncio.TimeoutError:
            return await send_error(send, 408, "RequestTimeout",
                                    f"the request body did not arrive within {self.timeout:g} s")
        if body is None:
            return await send_error(send, 413, "PayloadTooLarge", self._message("more"))
        if body is False:  # the client went away
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: waits for the disconnect, as a server's would

        return await self.app(scope, replay, send)

    def _message(self, size) -> str:
        return (f"the request body is {size} bytes; the service accepts at most {self.max_bytes} "
                "(--max-body-bytes); send a smaller image")

    async def _read(self, receive):
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return False
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
