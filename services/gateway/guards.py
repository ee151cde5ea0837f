"""The gateway's outer guards, as pure ASGI middleware: a request-body limit, and an error
boundary so that no request is ever answered with a bare 500.

Invariants:
- ``BodyLimit`` refuses a body larger than the limit of its path (longest configured prefix,
  else the default) before the application reads or parses it: a ``Content-Length`` above the
  limit is a 413 without reading a byte; a body without one (chunked) is counted as it is
  received and cut off with a 413 as soon as it passes the limit. Memory stays bounded by the
  limit whatever the client sends, with or without a token.
- ``ErrorBoundary`` turns any exception that escapes the application into JSON with a
  ``message``: 503 with ``Retry-After`` when PostgreSQL cannot be reached, else a 500 naming
  only a reference. The exception is logged with its traceback under that reference; nothing
  internal (paths, hosts, URLs) is sent to the caller.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

import asyncpg
import sqlalchemy.exc
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

DB_RETRY_AFTER = "5"


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than the {limit} bytes this route accepts")


def json_bytes(content: dict[str, Any]) -> bytes:
    """JSON that any text survives: lone surrogates (e.g. a prompt with ``\\ud800`` echoed in a 422)
    are escaped instead of failing the encoding."""
    return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()


async def send_json(
    send: Send, status: int, content: dict[str, Any], headers: dict[str, str] | None = None
) -> None:
    body = json_bytes(content)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    def __init__(self, app: ASGIApp, default: int, prefixes: dict[str, int]) -> None:
        self.app = app
        self.default = default
        self.prefixes = sorted(prefixes.items(), key=lambda item: len(item[0]), reverse=True)

    def limit_for(self, path: str) -> int:
        for prefix, limit in self.prefixes:
            if path.startswith(prefix):
                return limit
        return self.default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await send_json(send, 400, _error("Content-Length is not a number"))
                    return
                if declared > limit:
                    too_large = str(BodyTooLarge(limit).detail)
                    await send_json(send, 413, _error(too_large), {"Connection": "close"})
                    return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge as exc:
            if started:
                raise
            await send_json(send, 413, _error(str(exc.detail)), {"Connection": "close"})


class ErrorBoundary:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if isinstance(exc, BodyTooLarge):
                raise
            reference = uuid.uuid4().hex[:12]
            log.exception("%s %s failed (reference %s)", scope.get("method"), scope.get("path"), reference)
            if started:
                return  # the answer is on its way; the server closes the connection
            if database_unreachable(exc):
                message = "the task database is unavailable; retry shortly"
                await send_json(send, 503, _error(message), {"Retry-After": DB_RETRY_AFTER})
                return
            await send_json(send, 500, _error(f"internal error (reference {reference}); it has been logged"))


def database_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says PostgreSQL cannot be reached right now."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(
            seen,
            sqlalchemy.exc.OperationalError
            | sqlalchemy.exc.InterfaceError
            | sqlalchemy.exc.TimeoutError
            | asyncpg.PostgresConnectionError
            | asyncpg.CannotConnectNowError
            | asyncpg.InterfaceError
            | ConnectionError
            | TimeoutError,
        ):
            return True
        if isinstance(seen, sqlalchemy.exc.DBAPIError) and seen.connection_invalidated:
            return True
        if isinstance(seen, OSError) and seen.errno is not None:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _error(message: str) -> dict[str, str]:
    return {"message": message, "detail": message}
