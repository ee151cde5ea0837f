"""A local server that speaks fal.ai's queue protocol: the default provider when offline.

The reference is shared/fal-protocol.md; section numbers (§1…§7) point into it. The simulator
emulates fal independently of the rest of fluxpipe (its own model catalogue and input validation),
so the pipeline's client is tested against fal's wire protocol rather than against itself.

Where things are: catalog.py (model ids, input models, fal's 422 shapes, output sizes),
queue.py (request state, positions, logs, outcomes), store.py (the queue on disk),
generation.py + inputs.py + images.py (the model run), webhooks.py (delivery and signing),
faults.py (fault switches), settings.py (settings and faults), and here the routes.

Invariants of the HTTP surface:
- Submit accepts any JSON object for a known model; the request goes through the queue and the
  *result* carries a validation 422 (status still says COMPLETED), as fal does.
- Status, result and cancel answer only under `[namespace/]owner/alias` (§1); anything else is 404.
- The API key is compared in constant time and never echoed or logged; the fault control
  endpoint (``/_simulator/faults``) takes the same key.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from services.simulator.catalog import MODELS, fal_error
from services.simulator.faults import InjectedAnswer, garble, gate
from services.simulator.queue import Simulator
from services.simulator.settings import Faults, SimulatorSettings

__all__ = ["Faults", "SimulatorSettings", "create_app", "main"]

_NAMESPACES = ("workflows", "comfy")
_GRACEFUL_SHUTDOWN_SECONDS = 3


def _not_found(detail: str = "Request not found") -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=404)


def _truthy(flag: str | None) -> bool:
    return (flag or "").strip().lower() in ("1", "true", "yes")


def _split_endpoint(endpoint: str) -> tuple[str, str] | None:
    """(`[namespace/]owner/alias`, full id) for a model id, or None if it is not one (§1)."""
    parts = endpoint.strip("/").split("/")
    if any(not part for part in parts):
        return None
    head = parts[:1] if parts[0] in _NAMESPACES else []
    rest = parts[len(head) :]
    if len(rest) < 2:
        return None
    return "/".join(head + rest[:2]), "/".join(parts)


class _Unauthorized(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def _key_checker(api_key: str) -> Callable[[Request], None]:
    expected = f"Key {api_key}".encode()

    def require_key(request: Request) -> None:
        supplied = request.headers.get("authorization")
        if supplied is None:
            raise _Unauthorized("Missing Authorization header")
        if not hmac.compare_digest(supplied.encode(), expected):
            raise _Unauthorized("Invalid API key")

    return require_key


def create_app(settings: SimulatorSettings) -> FastAPI:
    """The simulator as an ASGI app."""
    sim = Simulator(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        sim.start()
        yield
        await sim.close()

    app = FastAPI(title="fal queue simulator", lifespan=lifespan)
    app.state.simulator = sim
    keyed = [Depends(_key_checker(settings.api_key))]
    control = APIRouter(prefix="/_simulator", dependencies=keyed)
    queue = APIRouter(dependencies=keyed)

    @app.exception_handler(_Unauthorized)
    async def unauthorized(_: Request, exc: _Unauthorized) -> JSONResponse:
        # ⚠ fal's 401 body is undocumented; FastAPI's `{"detail": …}` shape is used.
        return JSONResponse({"detail": exc.detail}, status_code=401)

    @app.exception_handler(InjectedAnswer)
    async def injected(_: Request, exc: InjectedAnswer) -> Response:
        return exc.response

    @app.get("/files/{request_id}/{name}")
    async def get_file(request_id: str, name: str) -> Response:
        """Download a generated image (public, like fal.media)."""
        stored = sim.store.get_file(request_id, name)
        if stored is None:
            return _not_found("File not found")
        return Response(stored[0], media_type=stored[1])

    @app.get("/.well-known/jwks.json")
    async def get_jwks() -> dict[str, Any]:
        """Public keys that verify the simulator's webhook signatures."""
        return sim.signer.jwks()

    @control.get("/faults")
    async def get_faults() -> dict[str, Any]:
        """The fault switches in force."""
        return sim.faults.model_dump(mode="json")

    @control.put("/faults")
    async def put_faults(request: Request) -> JSONResponse:
        """Replace every fault switch at once (`{}` turns them all off)."""
        try:
            faults = Faults.model_validate_json(await request.body() or b"{}")
        except ValidationError as exc:
            errors = exc.errors(include_url=False, include_context=False, include_input=False)
            where = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors)
            return JSONResponse({"message": f"invalid faults: {where}", "detail": errors}, status_code=422)
        sim.faults = faults
        return JSONResponse(faults.model_dump(mode="json"))

    @queue.get(
        "/{app_path:path}/requests/{request_id}/status/stream",
        response_model=None,
        dependencies=[Depends(gate(sim, "status"))],
    )
    async def stream_status(
        app_path: str, request_id: str, logs: Annotated[str | None, Query()] = None
    ) -> Response:
        """Follow a request's status as server-sent events until it is COMPLETED."""
        req = sim.lookup(app_path, request_id)
        if req is None:
            return _not_found()
        headers = {"Cache-Control": "no-cache", "x-fal-request-id": req.request_id}
        return StreamingResponse(
            sim.stream(req, _truthy(logs)), media_type="text/event-stream", headers=headers
        )

    @queue.get("/{app_path:path}/requests/{request_id}/status", dependencies=[Depends(gate(sim, "status"))])
    async def get_status(
        app_path: str, request_id: str, logs: Annotated[str | None, Query()] = None
    ) -> Response:
        """Report a request's status: 202 while queued or running, 200 once COMPLETED."""
        req = sim.lookup(app_path, request_id)
        if req is None:
            return _not_found()
        now = time.time()
        phase = sim.observe(req, now)
        body = sim.status_body(req, now, sim.logs(req, now) if _truthy(logs) else None)
        code = 200 if phase == "COMPLETED" else 202
        answer = JSONResponse(body, status_code=code, headers={"x-fal-request-id": req.request_id})
        return garble(sim, "status", answer)

    @queue.get("/{app_path:path}/requests/{request_id}", dependencies=[Depends(gate(sim, "result"))])
    async def get_result(app_path: str, request_id: str) -> Response:
        """Return a COMPLETED request's result: the model's output or its error, as fal relays it."""
        req = sim.lookup(app_path, request_id)
        if req is None:
            return _not_found()
        if sim.observe(req, time.time()) != "COMPLETED":
            return JSONResponse({"detail": "Request is still in progress"}, status_code=400)
        outcome = await sim.outcome(req)
        headers = {**outcome.headers, "x-fal-request-id": req.request_id}
        return garble(
            sim, "result", JSONResponse(outcome.body, status_code=outcome.status_code, headers=headers)
        )

    @queue.put("/{app_path:path}/requests/{request_id}/cancel", dependencies=[Depends(gate(sim, "cancel"))])
    async def cancel_request(app_path: str, request_id: str) -> Response:
        """Cancel a queued or running request (202), or report it ALREADY_COMPLETED (400)."""
        req = sim.lookup(app_path, request_id)
        if req is None:
            # ⚠ the HTTP code of NOT_FOUND is undocumented; 404 with both fal body shapes.
            return JSONResponse({"status": "NOT_FOUND", "detail": "Request not found"}, status_code=404)
        if sim.cancel(req):
            return garble(sim, "cancel", JSONResponse({"status": "CANCELLATION_REQUESTED"}, status_code=202))
        return garble(sim, "cancel", JSONResponse({"status": "ALREADY_COMPLETED"}, status_code=400))

    @queue.post("/{endpoint:path}", dependencies=[Depends(gate(sim, "submit"))])
    async def submit(
        endpoint: str, request: Request, fal_webhook: Annotated[str | None, Query()] = None
    ) -> Response:
        """Queue a request for a model; the answer carries the URLs to follow it (§1)."""
        parsed = _split_endpoint(endpoint)
        if parsed is None or parsed[1] not in MODELS:
            # ⚠ fal's answer for an unknown application is undocumented.
            return _not_found(f"Application '{endpoint.strip('/')}' not found")
        app_path, model_id = parsed
        try:
            arguments = json.loads(await request.body() or b"null")
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):
            # ⚠ a body that is not a JSON object is refused at submit rather than queued.
            msg = "Input should be a valid dictionary or object to extract fields from"
            return JSONResponse({"detail": [fal_error((), msg, "model_attributes_type")]}, status_code=422)
        start_timeout: float | None = None
        try:
            start_timeout = float(request.headers["x-fal-request-timeout"])
        except (KeyError, ValueError):
            pass
        req = sim.submit(app_path, model_id, arguments, fal_webhook or None, start_timeout)
        body: dict[str, Any] = {
            "status": "IN_QUEUE",
            "request_id": req.request_id,
            **req.urls(),
            "logs": None,
            "metrics": {},
            "queue_position": sim.queue_position(req, time.time()),
        }
        if fal_webhook:
            body["gateway_request_id"] = req.request_id
        return garble(sim, "submit", JSONResponse(body, headers={"x-fal-request-id": req.request_id}))

    app.include_router(control)
    app.include_router(queue)
    return app


def main(host: str, port: int, settings: SimulatorSettings) -> None:
    """Serve the simulator until interrupted."""
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_SECONDS,
    )
