"""Whether the gateway takes a job: enabled, within the rate limit, fair share, paid for.

``admit`` runs just before a job's ``TaskRequested`` is published, in this order: the live
configuration must have Flux enabled (else 503); the user must be within the per-user job rate
(429 with ``Retry-After``); then, when credits or the per-user in-flight cap are on, the job's
cost and slot are held on the user's ledger (402 with the balance, or 429) before the request
is published. The hold carries the request, so if this process dies before publishing it the
ledger worker publishes it (same msg id): a held job is never lost, and never held twice.
"""

from __future__ import annotations

import contextlib
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.responses import JSONResponse

from schemas.events import TaskRequested
from services.common import credits
from services.common.auth import Principal
from services.common.bus import Bus
from services.common.config import LiveConfig, check_config_key
from services.common.ratelimit import Action, RateLimited, RateLimiter
from services.common.settings import Settings
from services.gateway.deps import CurrentUser


class Refused(HTTPException):
    """A JSON error answer with ``message`` and extra fields (e.g. the balance on a 402). An
    ``HTTPException``, so routes with their own error shape (OpenAI's) convert it like any other."""

    def __init__(
        self, status_code: int, message: str, headers: dict[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(status_code, message, headers)
        self.message = message
        self.extra = extra


async def start(app: FastAPI, settings: Settings, bus: Bus) -> None:
    """Follow the live configuration and open the rate limiter (called from the lifespan)."""
    check_config_key(settings)
    live = LiveConfig(settings)
    await live.start(bus)
    app.state.live_config = live
    app.state.rate_limiter = await RateLimiter.open(bus, settings)


async def stop(app: FastAPI) -> None:
    with contextlib.suppress(AttributeError):
        await app.state.live_config.stop()


def install(app: FastAPI) -> None:
    @app.exception_handler(Refused)
    async def on_refused(request: Request, exc: Refused) -> JSONResponse:
        content = {"message": exc.message, "detail": exc.message, **exc.extra}
        return JSONResponse(status_code=exc.status_code, content=content, headers=exc.headers)


def live_config(request: Request) -> LiveConfig:
    live: LiveConfig = request.app.state.live_config
    return live


async def rate_limit(request: Request, action: Action, user_id: str) -> None:
    """One ``action`` of the user against the shared per-user limit; 429 when it is used up."""
    limiter: RateLimiter = request.app.state.rate_limiter
    try:
        await limiter.take(action, user_id)
    except RateLimited as exc:
        raise Refused(
            status.HTTP_429_TOO_MANY_REQUESTS, str(exc), headers={"Retry-After": str(exc.retry_after)}
        ) from exc


async def admit(request: Request, bus: Bus, event: TaskRequested) -> None:
    """Refuse the job with the reason, or hold what it needs (see the module docstring)."""
    live = live_config(request)
    if not live.enabled:
        raise Refused(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "Flux image generation is turned off by an administrator; tasks already running will finish",
            headers={"Retry-After": "60"},
        )
    await rate_limit(request, "jobs", event.user_id)
    cost = live.cost_of(event.data.model) if live.credits_on else 0
    max_open = live.settings.max_tasks_per_user
    if not live.credits_on and not max_open:
        return
    try:
        await credits.hold(bus, event, cost, max_open)
    except credits.InsufficientCredits as exc:
        raise Refused(status.HTTP_402_PAYMENT_REQUIRED, str(exc), balance=exc.balance, cost=exc.cost) from exc
    except credits.TooManyInFlight as exc:
        raise Refused(
            status.HTTP_429_TOO_MANY_REQUESTS, str(exc), headers={"Retry-After": "5"}, limit=exc.limit
        ) from exc
    except credits.LedgerBusy as exc:
        raise Refused(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc), headers={"Retry-After": "1"}) from exc


async def _upload_rate_limit(request: Request, user: CurrentUser) -> Principal:
    await rate_limit(request, "uploads", user.user_id)
    return user


UploadingUser = Annotated[Principal, Depends(_upload_rate_limit)]
"""The caller of an upload route, counted against ``FLUXPIPE_RATE_UPLOADS`` (429 when over)."""
