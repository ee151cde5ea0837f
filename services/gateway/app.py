"""The gateway's FastAPI application: auth, validation, queries, and the local file store."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats.errors
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy import text
from starlette.exceptions import HTTPException as StarletteHTTPException

from schemas.catalog import MODELS, TEXT_TO_IMAGE_MODELS, Mode
from services.common.auth import check_secret
from services.common.bus import Bus
from services.common.db import make_engine
from services.common.settings import Settings
from services.common.storage import make_storage
from services.gateway import admission
from services.gateway.guards import BodyLimit, ErrorBoundary, json_bytes
from services.gateway.routes import (
    admin,
    admin_config,
    credits,
    events,
    flux,
    history,
    images,
    models,
    openai_images,
    tasks,
    uploads,
    webhooks,
)

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).parent / "web"


def _describe(errors: list[dict[str, Any]]) -> str:
    """One sentence naming every wrong field: ``"<field>: <what is wrong>; …"``."""
    parts = []
    for err in errors:
        if err.get("type") == "json_invalid":
            reason = (err.get("ctx") or {}).get("error", "")
            parts.append(f"the request body is not valid JSON ({reason})" if reason else "invalid JSON")
            continue
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    return "; ".join(parts)


def check_default_model(settings: Settings) -> None:
    spec = MODELS.get(settings.default_model)
    if spec is None or spec.mode is not Mode.TEXT_TO_IMAGE:
        raise RuntimeError(
            f"FLUXPIPE_DEFAULT_MODEL={settings.default_model!r} is not a text-to-image model; "
            f"choose one of {', '.join(TEXT_TO_IMAGE_MODELS)}"
        )


async def _passes(check: Callable[[], Awaitable[None]], within: float = 2.0) -> bool:
    try:
        async with asyncio.timeout(within):
            await check()
    except Exception:
        return False
    return True


async def _connect_unless_stopped(settings: Settings, app: FastAPI) -> Bus:
    """Connect to NATS (retried forever), but give up when the server is told to stop: uvicorn
    only notes a SIGTERM during start-up, so a gateway whose NATS is unreachable would
    otherwise outlive its supervisor. ``app.state.server`` is the uvicorn server, if known."""
    connecting = asyncio.ensure_future(Bus.connect(settings, "gateway"))
    server = getattr(app.state, "server", None)
    while not connecting.done():
        await asyncio.wait({connecting}, timeout=0.2)
        if server is not None and server.should_exit and not connecting.done():
            connecting.cancel()
            raise RuntimeError("stopped while connecting to NATS")
    return connecting.result()


def create_app(settings: Settings) -> FastAPI:
    check_secret(settings)
    check_default_model(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.bus = await _connect_unless_stopped(settings, app)
        app.state.engine = make_engine(settings)
        app.state.storage = make_storage(settings)
        await admission.start(app, settings, app.state.bus)
        try:
            yield
        finally:
            await admission.stop(app)
            app.state.storage.close()
            await app.state.engine.dispose()
            await app.state.bus.close()

    app = FastAPI(title="fluxpipe", version="0.1.0", lifespan=lifespan)

    # Every error answer carries ``message``, one readable sentence saying what was wrong;
    # ``detail`` stays as FastAPI clients expect it (a string, or pydantic's list for 422).
    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        detail: Any = exc.detail
        if exc.status_code == 422 and isinstance(detail, str):
            # every 422 has pydantic's shape in ``detail``, as the OpenAPI schema promises
            detail = [{"loc": ["request"], "msg": detail, "type": "value_error"}]
        return JSONResponse(
            status_code=exc.status_code,
            content={"message": message, "detail": detail},
            headers=exc.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> Response:
        errors = jsonable_encoder(exc.errors())
        content = {"message": _describe(errors), "detail": errors}
        return Response(json_bytes(content), status_code=422, media_type="application/json")

    @app.exception_handler(nats.errors.Error)
    async def on_event_log_down(request: Request, exc: nats.errors.Error) -> JSONResponse:
        log.error("event log unavailable: %r", exc)
        message = "the event log (NATS) is unavailable; retry shortly with the same Idempotency-Key"
        return JSONResponse(
            status_code=503, content={"message": message, "detail": message}, headers={"Retry-After": "2"}
        )

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz(request: Request) -> JSONResponse:
        async def nats_round_trip() -> None:
            await request.app.state.bus.nc.flush(timeout=1)  # not just an open socket

        async def postgres_query() -> None:
            async with request.app.state.engine.connect() as conn:
                await conn.execute(text("select 1"))

        checks = {"nats": await _passes(nats_round_trip), "postgres": await _passes(postgres_query)}
        return JSONResponse(status_code=200 if all(checks.values()) else 503, content=checks)

    app.include_router(flux.router)
    app.include_router(openai_images.router)
    app.include_router(tasks.router)
    app.include_router(webhooks.router)
    app.add_middleware(ErrorBoundary)
    app.add_middleware(BodyLimit, default=settings.body_limit_bytes, prefixes=settings.body_limit_prefixes)
    app.include_router(history.router)
    app.include_router(events.router)
    app.include_router(models.router)
    app.include_router(images.router)
    app.include_router(uploads.router)
    admin.instrument(app)
    app.include_router(credits.router)
    app.include_router(admin_config.router)
    admission.install(app)
    settings.storage_dir.mkdir(parents=True, exist_ok=True)
    app.mount("/files", StaticFiles(directory=settings.storage_dir), name="files")
    app.mount("/ui", StaticFiles(directory=WEB_DIR), name="ui")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        """The image page (plain HTML and JavaScript in ``services/gateway/web``)."""
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    return app
