"""``/api/flux``: submit jobs and read tasks. Routes publish events and read projections only."""

from __future__ import annotations

import hashlib
import hmac
import logging
import uuid
from collections.abc import Mapping
from typing import Annotated, Any, cast

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response, status
from sqlalchemy import Table, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from schemas.api import HistoryPage, TaskAccepted, TaskOut, TextToImageRequest
from schemas.catalog import MODELS, Family
from schemas.events import TaskRequested, TaskRequestedData, TaskStatus
from services.common.auth import Principal
from services.common.bus import Bus
from services.common.db import FluxTask
from services.common.settings import Settings
from services.common.storage import Storage, fresh_urls
from services.gateway import admission
from services.gateway.deps import BusDep, CurrentUser, EngineDep, StorageDep
from services.gateway.from_log import task_from_log
from services.gateway.guards import database_unreachable
from services.gateway.lineage import retries_of

router = APIRouter(prefix="/api/flux", tags=["flux"])
log = logging.getLogger(__name__)
MAX_PAGE = 100_000  # keeps the row offset far inside PostgreSQL's bigint

tasks = cast(Table, FluxTask.__table__)


def new_task_id(user_id: str, idempotency_key: str | None, secret: str) -> str:
    """A random id, or with an ``Idempotency-Key`` the same id for the same user and key: keyed
    with ``FLUXPIPE_IDEMPOTENCY_SECRET`` (not the token secret, so rotating that never turns a
    retried submit into a second job), so nobody can work out a task id from them."""
    if idempotency_key:
        digest = hmac.new(secret.encode(), f"{user_id}\n{idempotency_key}".encode(), hashlib.sha256)
        return digest.hexdigest()[:32]
    return uuid.uuid4().hex


@router.post("/text-to-image", status_code=status.HTTP_202_ACCEPTED, response_model=TaskAccepted)
async def text_to_image(
    body: TextToImageRequest,
    user: CurrentUser,
    response: Response,
    request: Request,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> TaskAccepted:
    """Queue a text-to-image job; returns the task id at once (the provider is never awaited).

    With an ``Idempotency-Key`` a retried submit returns the same task; the same key with a
    different job is a 409, never a silent answer about the other job.
    """
    # The process's bus, engine and settings straight from the app, not as dependencies:
    # each dependency is resolved per request, and this is the route that takes the load.
    state = request.app.state
    bus: Bus = state.bus
    engine: AsyncEngine = state.engine
    settings: Settings = state.settings
    model = body.model or settings.default_model
    spec = MODELS[model]
    steps = body.num_inference_steps
    if steps is None and spec.family is Family.FLUX1:
        steps = spec.default_steps
    data = TaskRequestedData(
        model=model,
        task_type="text_to_image",
        prompt=body.prompt,
        num_images=body.num_images,
        aspect_ratio=body.aspect_ratio,
        guidance_scale=body.guidance_scale,
        num_inference_steps=steps,
        seed=body.seed,
        safety_tolerance=body.safety_tolerance,
        output_format=body.output_format,
    )
    return await accept_job(request, data, user, bus, engine, settings, response, idempotency_key)


async def accept_job(
    request: Request,
    data: TaskRequestedData,
    user: Principal,
    bus: Bus,
    engine: AsyncEngine,
    settings: Settings,
    response: Response,
    idempotency_key: str | None,
) -> TaskAccepted:
    """The one way a validated job becomes a task, for every route that takes jobs: the task
    id (deterministic under an ``Idempotency-Key``), the idempotency check, admission (the
    switch, rate limits, credits, the per-user cap: ``services/gateway/admission.py``), the
    publish."""
    task_id = new_task_id(user.user_id, idempotency_key, settings.idempotency_secret.get_secret_value())
    response.headers["Location"] = f"/api/flux/task/{task_id}"
    if idempotency_key and await already_requested(bus, task_id, data):
        return TaskAccepted(task_id=task_id, status=await current_status(engine, task_id), model=data.model)
    event = TaskRequested(task_id=task_id, user_id=user.user_id, data=data)
    await admission.admit(request, bus, event)
    ack = await bus.publish(event)
    if ack.duplicate:  # a concurrent submit with the same key got there first
        await already_requested(bus, task_id, data)
    return TaskAccepted(task_id=task_id, status="PENDING", model=data.model)


async def already_requested(bus: Bus, task_id: str, data: TaskRequestedData) -> bool:
    """Whether this job is already in the log under ``task_id``; a different job there is a 409.

    Never publishing it again matters beyond the server's de-duplication window: a second
    ``TaskRequested`` would be a second job at fal.
    """
    existing = await bus.last_event(task_id, "requested")
    if not isinstance(existing, TaskRequested):
        return False
    if existing.data != data:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"Idempotency-Key already used for another job (task {task_id}); use a new key for a new job",
        )
    return True


async def current_status(engine: AsyncEngine, task_id: str) -> TaskStatus:
    """The task's status in the read model; PENDING if it is not there yet or cannot be read
    (the job is in the log either way, which is what the caller needs to know)."""
    try:
        async with engine.connect() as conn:
            found = (await conn.execute(select(tasks.c.status).where(tasks.c.id == task_id))).scalar()
    except Exception:
        found = None
    return cast(TaskStatus, found or "PENDING")


def task_out(row: Mapping[Any, Any], storage: Storage | None = None) -> TaskOut:
    data = dict(row)
    if storage is not None and data["cloud_images"]:
        data["cloud_image_url"], data["cloud_images"] = fresh_urls(storage, data["cloud_images"])
    return TaskOut(
        **{k: v for k, v in data.items() if k in TaskOut.model_fields and k not in ("image_url", "images")},
        image_url=data["cloud_image_url"] or data["image_url"],
        provider_image_url=data["image_url"],
        images=data["cloud_images"] or data["images"] or [],
    )


@router.get("/task/{task_id}", response_model=TaskOut)
async def get_task(
    task_id: str, user: CurrentUser, engine: EngineDep, bus: BusDep, storage: StorageDep
) -> TaskOut:
    """One task of the caller (any task for an admin); from the event log if PostgreSQL is down."""
    query = select(tasks).where(tasks.c.id == task_id)
    if not user.admin:
        query = query.where(tasks.c.user_id == user.user_id)
    try:
        async with engine.connect() as conn:
            row = (await conn.execute(query)).first()
            retried = await retries_of(conn, [task_id]) if row is not None else {}
    except Exception as exc:
        if not database_unreachable(exc):
            raise
        log.warning("task database unavailable, answering task %s from the event log: %r", task_id, exc)
        row = None
    if row is not None:
        return task_out(row._mapping, storage).model_copy(update={"retried_by": retried.get(task_id, [])})
    if folded := await task_from_log(bus, task_id, user):
        return task_out(folded, storage)
    raise HTTPException(status.HTTP_404_NOT_FOUND, f"task {task_id} not found")


@router.get("/history", response_model=HistoryPage)
async def history(
    user: CurrentUser,
    engine: EngineDep,
    storage: StorageDep,
    page: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 1,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> HistoryPage:
    """The caller's Flux tasks, newest first."""
    mine = tasks.c.user_id == user.user_id
    async with engine.connect() as conn:
        total = (await conn.execute(select(func.count()).select_from(tasks).where(mine))).scalar_one()
        rows = (
            await conn.execute(
                select(tasks)
                .where(mine)
                .order_by(tasks.c.created_at.desc(), tasks.c.id.desc())
                .limit(limit)
                .offset((page - 1) * limit)
            )
        ).all()
        retried = await retries_of(conn, [r.id for r in rows])
    items = [
        task_out(r._mapping, storage).model_copy(update={"retried_by": retried.get(r.id, [])}) for r in rows
    ]
    return HistoryPage(items=items, total=total, page=page, limit=limit)
