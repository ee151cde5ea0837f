"""Ending a task whose next step was dead-lettered, so that it never stays unfinished."""

from __future__ import annotations

import contextlib
import logging

from schemas.events import (
    TERMINAL_TOKENS,
    FailureStage,
    FluxEvent,
    StorageFailed,
    StorageFailedData,
    TaskFailed,
    TaskFailedData,
    TaskSubmitted,
)
from services.common.bus import Bus
from services.common.fal import FalClient, FalError

log = logging.getLogger(__name__)


async def fail_dead_lettered(
    bus: Bus, event: FluxEvent, reason: str, *, fal: FalClient, stage: FailureStage
) -> None:
    """Fail the task of a dead-lettered ``event`` (and cancel it at fal if it got there).

    Does nothing if the task has ended already. The user sees that the pipeline failed, not
    the internal reason, which operators find with the dead letter.
    """
    latest = await bus.latest(event.task_id)
    if latest.has_any(TERMINAL_TOKENS):
        return
    submitted = latest.event("submitted")
    if isinstance(submitted, TaskSubmitted):
        with contextlib.suppress(FalError):
            await fal.cancel(submitted.data.cancel_url)
    log.error("failing task %s after dead-lettering it: %s", event.task_id, reason)
    await bus.publish(
        TaskFailed.caused_by(
            event,
            TaskFailedData(
                stage=stage,
                error="the pipeline could not process this task; operators: see its dead letter",
                request_id=submitted.data.request_id if isinstance(submitted, TaskSubmitted) else None,
            ),
        )
    )


async def storage_failed_dead_lettered(bus: Bus, event: FluxEvent, reason: str) -> None:
    """The uploader gave up on a completed task: record that its copy could not be made (the
    task stays SUCCESS with fal's URL), so its story still ends."""
    if await bus.last_event(event.task_id, "stored") is not None:
        return
    await bus.publish(
        StorageFailed.caused_by(
            event,
            StorageFailedData(
                error="the copy to our storage could not be made; operators: see its dead letter"
            ),
        )
    )
