"""``/api/flux/task/{id}/cancel`` and ``/retry``: a task's lifecycle after it was submitted.

Both routes only publish events; they never call fal and never write a table.

- Cancel publishes ``TaskCancelled``. Every terminal event has the msg id ``<task>.end``, so if
  the task ended some other way first (completed, failed, a concurrent cancel) the server drops
  ours and the answer is a 409: a task ends exactly once. The submitter, which holds the task's
  ``TaskRequested`` while it is live, wakes on the terminal event, cancels the job at fal if it
  got there, and acks, which frees the concurrency slot at once; a task still PENDING is acked
  unsubmitted when its turn comes.
- Retry publishes a new ``TaskRequested`` with the same inputs and ``retry_of`` set, owned by
  the caller, through the same ``accept_job`` as every submit (``Idempotency-Key``, admission:
  rate limits, credits, the per-user cap); the API
  shows ``retry_of`` on the new task and ``retried_by`` on the old one (read from the read model).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Request, Response, status

from schemas.api import TaskAccepted
from schemas.events import TaskCancelled, TaskCancelledData, TaskRequested, TaskStatus
from services.common.auth import Principal
from services.common.bus import Bus
from services.gateway.deps import BusDep, CurrentUser, EngineDep, SettingsDep
from services.gateway.routes.flux import accept_job

router = APIRouter(prefix="/api/flux", tags=["flux"])

_ENDED: dict[str, TaskStatus] = {"completed": "SUCCESS", "failed": "FAILED", "cancelled": "CANCELLED"}


async def owned_request(bus: Bus, task_id: str, user: Principal) -> TaskRequested:
    """The task's ``TaskRequested`` from the log, if the caller may act on it; else a 404."""
    event = await bus.last_event(task_id, "requested") if task_id.isalnum() else None
    if not isinstance(event, TaskRequested) or not (user.admin or event.user_id == user.user_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"task {task_id} not found")
    return event


async def ended_as(bus: Bus, task_id: str) -> TaskStatus | None:
    """How the task ended, from the log (the source of truth), or None while it is live."""
    for token, outcome in _ENDED.items():
        if await bus.last_event(task_id, token) is not None:
            return outcome
    return None


@router.post("/task/{task_id}/cancel", response_model=TaskAccepted)
async def cancel_task(task_id: str, user: CurrentUser, bus: BusDep) -> TaskAccepted:
    """Cancel a task that has not ended: it never reaches fal, or is cancelled there."""
    requested = await owned_request(bus, task_id, user)
    model = requested.data.model
    if (outcome := await ended_as(bus, task_id)) is not None:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"task {task_id} has already ended ({outcome}); nothing to cancel"
        )
    cancel = TaskCancelled.caused_by(requested, TaskCancelledData(reason=f"cancelled by {user.user_id}"))
    ack = await bus.publish(cancel)
    if ack.duplicate:
        outcome = await ended_as(bus, task_id)
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"task {task_id} has already ended ({outcome or 'ended'}); nothing to cancel",
        )
    return TaskAccepted(task_id=task_id, status="CANCELLED", model=model)


@router.post("/task/{task_id}/retry", status_code=status.HTTP_202_ACCEPTED, response_model=TaskAccepted)
async def retry_task(
    task_id: str,
    request: Request,
    user: CurrentUser,
    bus: BusDep,
    engine: EngineDep,
    settings: SettingsDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> TaskAccepted:
    """Queue a new task with the inputs of an ended one, linked to it (``retry_of``/``retried_by``)."""
    original = await owned_request(bus, task_id, user)
    if await ended_as(bus, task_id) is None:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"task {task_id} has not ended yet; wait for it or cancel it before retrying",
        )
    data = original.data.model_copy(update={"retry_of": task_id})
    return await accept_job(request, data, user, bus, engine, settings, response, idempotency_key)
