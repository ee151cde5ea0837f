"""Fault injection on the queue endpoints, driven by `Faults` (settings.py).

Order for one answer of kind K (after the key check, before any work): added latency, then a
hang, then a pending 429 burst, then the per-status error rates. An injected error never touches
the queue: a submit answered 503 queued nothing, as when fal's ingress fails. A malformed body is
decided after the work is done, so a status or cancel that was answered garbled did happen.

Injected bodies follow fal: 429 and 500 are JSON `{"detail": …}`; 502/503/504 are nginx's HTML
page without `x-fal-request-id` (the shape fal's clients treat as a retryable ingress error).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from services.simulator.queue import Simulator
from services.simulator.settings import FaultKind

HANG_LIMIT_SECONDS = 3600.0
_DISCONNECT_POLL_SECONDS = 0.1
_REASONS = {
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Temporarily Unavailable",
    504: "Gateway Time-out",
}


class InjectedAnswer(Exception):
    """Raised by the fault gate; the app answers with `response` instead of the route."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


def injected_response(code: int, retry_after: int) -> Response:
    if code in (502, 503, 504):
        reason = _REASONS[code]
        html = (
            f"<html>\r\n<head><title>{code} {reason}</title></head>\r\n<body>\r\n"
            f"<center><h1>{code} {reason}</h1></center>\r\n"
            "<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
        )
        return HTMLResponse(html, status_code=code)
    if code == 429:
        return JSONResponse(
            {"detail": "Too many requests"}, status_code=429, headers={"Retry-After": str(retry_after)}
        )
    detail = _REASONS.get(code, f"Simulated error {code}")
    return JSONResponse({"detail": detail}, status_code=code)


def gate(sim: Simulator, kind: FaultKind) -> Callable[[Request], Awaitable[None]]:
    """A route dependency applying the faults of `kind` before the route runs."""

    async def apply_faults(request: Request) -> None:
        faults = sim.faults
        delay = faults.latency_seconds.get(kind, 0.0)
        if delay > 0:
            await asyncio.sleep(delay)
        if kind in faults.hang:
            deadline = time.monotonic() + HANG_LIMIT_SECONDS
            while time.monotonic() < deadline and not await request.is_disconnected():  # noqa: ASYNC110 - Starlette offers no disconnect event to await
                await asyncio.sleep(_DISCONNECT_POLL_SECONDS)
            raise InjectedAnswer(injected_response(504, 0))
        if faults.burst_429 > 0:
            faults.burst_429 -= 1
            raise InjectedAnswer(injected_response(429, faults.retry_after_seconds))
        roll = sim.random.random()
        for code, rate in sorted(faults.error_rates.get(kind, {}).items()):
            if roll < rate:
                raise InjectedAnswer(injected_response(code, faults.retry_after_seconds))
            roll -= rate

    return apply_faults


def garble(sim: Simulator, kind: FaultKind, response: Response) -> Response:
    """The answer, or (at the `malformed_json` rate) the same answer with its JSON cut in half."""
    if not sim.roll(sim.faults.malformed_json.get(kind, 0.0)):
        return response
    raw = bytes(response.body)
    headers = {
        k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")
    }
    return Response(
        raw[: len(raw) // 2], status_code=response.status_code, headers=headers, media_type="application/json"
    )
