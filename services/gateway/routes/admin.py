"""Operators' routes: ``GET /metrics`` (Prometheus) and ``GET /api/flux/admin/stats`` (admins).

The stats are computed by SQL from the read models only (``flux_tasks``), for the tasks
created in the window ``[since, until)``: they are as fresh as the projector, and a replay
gives the same figures. Rates are over the tasks that ended in the window's set (SUCCESS,
FAILED, CANCELLED), or over the successful ones for the upload failure rate; a rate with
nothing to divide by is null, never a made-up 0.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, HTTPException, Query, Response, status
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from sqlalchemy import text
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.metrics import HTTP_REQUESTS
from services.gateway.deps import CurrentUser, EngineDep

router = APIRouter()

PROVIDER_STAGES = ("submit", "poll", "result")


class ModelUse(BaseModel):
    model: str
    tasks: int
    succeeded: int


class Stats(BaseModel):
    since: datetime
    until: datetime
    tasks: int
    by_status: dict[str, int]
    finished: int
    success_rate: float | None
    generation_time_mean: float | None
    generation_time_p95: float | None
    use_per_model: list[ModelUse]
    storage_used_bytes: int
    stored_images: int
    provider_failure_rate: float | None
    timeout_rate: float | None
    upload_failure_rate: float | None


SUMMARY = text(
    """
    select count(*) as tasks,
           count(*) filter (where status in ('SUCCESS', 'FAILED', 'CANCELLED')) as finished,
           count(*) filter (where status = 'SUCCESS') as succeeded,
           count(*) filter (where status = 'FAILED' and failure_stage = any(:provider_stages))
               as provider_failed,
           count(*) filter (where status = 'FAILED' and failure_stage = 'timeout') as timed_out,
           count(*) filter (where status = 'SUCCESS' and storage_error is not null) as upload_failed,
           avg(generation_time) filter (where status = 'SUCCESS') as gen_mean,
           percentile_cont(0.95) within group (order by generation_time)
               filter (where status = 'SUCCESS' and generation_time is not null) as gen_p95
      from flux_tasks
     where created_at >= :since and created_at < :until
    """
)
BY_STATUS = text(
    "select status, count(*) from flux_tasks"
    " where created_at >= :since and created_at < :until group by status"
)
PER_MODEL = text(
    """
    select model, count(*) as tasks, count(*) filter (where status = 'SUCCESS') as succeeded
      from flux_tasks where created_at >= :since and created_at < :until
     group by model order by count(*) desc, model
    """
)
STORAGE = text(
    """
    select coalesce(sum((img->>'size')::bigint), 0) as bytes, count(img) as images
      from flux_tasks t
     cross join lateral jsonb_array_elements(
         case when jsonb_typeof(t.cloud_images) = 'array' then t.cloud_images else '[]'::jsonb end
     ) img
     where t.created_at >= :since and t.created_at < :until
    """
)


def _rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None


@router.get("/api/flux/admin/stats", response_model=Stats, tags=["admin"])
async def admin_stats(
    user: CurrentUser,
    engine: EngineDep,
    since: Annotated[datetime | None, Query(description="window start (ISO 8601); default: 24 h ago")] = None,
    until: Annotated[datetime | None, Query(description="window end, exclusive; default: now")] = None,
) -> Stats:
    """The plan's monitoring figures for tasks created in ``[since, until)`` (admins only)."""
    if not user.admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "admin rights required (a token made with --admin)")
    until = _aware(until) if until is not None else datetime.now(UTC)
    since = _aware(since) if since is not None else until - timedelta(days=1)
    if since >= until:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "since: must be before until")
    window: dict[str, Any] = {"since": since, "until": until}
    async with engine.connect() as conn:
        s = (await conn.execute(SUMMARY, {**window, "provider_stages": list(PROVIDER_STAGES)})).one()
        by_status = {row[0]: int(row[1]) for row in await conn.execute(BY_STATUS, window)}
        models = [
            ModelUse(model=r.model, tasks=r.tasks, succeeded=r.succeeded)
            for r in await conn.execute(PER_MODEL, window)
        ]
        storage = (await conn.execute(STORAGE, window)).one()
    return Stats(
        since=since,
        until=until,
        tasks=s.tasks,
        by_status=by_status,
        finished=s.finished,
        success_rate=_rate(s.succeeded, s.finished),
        generation_time_mean=float(s.gen_mean) if s.gen_mean is not None else None,
        generation_time_p95=float(s.gen_p95) if s.gen_p95 is not None else None,
        use_per_model=models,
        storage_used_bytes=int(storage.bytes),
        stored_images=int(storage.images),
        provider_failure_rate=_rate(s.provider_failed, s.finished),
        timeout_rate=_rate(s.timed_out, s.finished),
        upload_failure_rate=_rate(s.upload_failed, s.succeeded),
    )


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@router.get("/metrics", include_in_schema=False)
async def metrics() -> Response:
    """This gateway process's Prometheus metrics (no token, like ``/healthz``)."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


class CountRequests:
    """ASGI middleware counting answered requests by method, route template and status (the
    template, not the path, so task ids never become series)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        code = 500

        async def sending(message: Message) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or (
                "/files" if scope["path"].startswith("/files/") else "other"
            )
            HTTP_REQUESTS.labels(scope["method"], template, str(code)).inc()


def instrument(app: FastAPI) -> None:
    """Count the gateway's requests and serve ``/metrics`` and the admin stats."""
    app.add_middleware(CountRequests)
    app.include_router(router)
