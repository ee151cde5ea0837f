"""The poller: follows a submitted task at fal until it ends.

``TaskSubmitted`` → ``TaskStatusChanged``… → ``TaskCompleted`` | ``TaskFailed``.

Invariants:
- The ``TaskSubmitted`` message is held unacked (``in_progress`` heartbeats) while the task
  is followed, and acked only after the terminal event is published: a crashed poller's
  tasks are redelivered to another replica, which resumes from the stream.
- One event per change, never one per poll; the n-th status change has msg id
  ``<task>.status.<n>``, and a resumed poller continues n from the last stored status event.
- Polling is adaptive: ``poll_interval_min`` after a change, growing ×1.5 to
  ``poll_interval_max`` while nothing changes. The task fails after ``task_timeout_seconds``
  from submission, and is then cancelled at fal (best effort).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta
from functools import partial

from nats.aio.msg import Msg

from schemas.events import (
    TERMINAL_TOKENS,
    FailureStage,
    ProviderImage,
    TaskCompleted,
    TaskCompletedData,
    TaskFailed,
    TaskFailedData,
    TaskStatusChanged,
    TaskStatusChangedData,
    TaskSubmitted,
    utcnow,
)
from services.common import config
from services.common.bus import Bus, Consumer, hold
from services.common.ending import fail_dead_lettered
from services.common.fal import FalClient, FalError, QueueStatus
from services.common.settings import Settings
from services.common.worker import TypedHandler, Worker

log = logging.getLogger(__name__)


def consumer(settings: Settings, fal: FalClient) -> Consumer:
    return Consumer(
        durable="poller",
        token="submitted",
        ack_wait=settings.failover_seconds,
        max_deliver=20,
        concurrency=500,
        on_dead_letter=partial(fail_dead_lettered, fal=fal, stage="poll"),
    )


async def on_submitted(
    event: TaskSubmitted, msg: Msg, *, bus: Bus, fal: FalClient, settings: Settings
) -> None:
    if await bus.has_any(event.task_id, TERMINAL_TOKENS):
        return
    envelope = {"task_id": event.task_id, "user_id": event.user_id, "causation_id": event.event_id}

    async def fail(stage: FailureStage, exc: FalError | None = None, error: str | None = None) -> None:
        if await bus.has_any(event.task_id, TERMINAL_TOKENS):
            return  # ended meanwhile (the submitter's backstop): a task ends once
        await bus.publish(
            TaskFailed(
                **envelope,
                data=TaskFailedData(
                    stage=stage,
                    error=error or (exc.message if exc else "failed"),
                    error_type=exc.error_type if exc else None,
                    status_code=exc.status_code if exc else None,
                    request_id=event.data.request_id,
                ),
            )
        )

    last = await bus.last_event(event.task_id, "status")
    seq = last.data.seq if isinstance(last, TaskStatusChanged) else 0
    seen = (
        (last.data.status, last.data.queue_position)
        if isinstance(last, TaskStatusChanged)
        else ("IN_QUEUE", event.data.queue_position)
    )
    deadline = event.occurred_at + timedelta(seconds=settings.task_timeout_seconds)
    interval = settings.poll_interval_min

    async with hold(msg, every=settings.failover_seconds / 3):
        while True:
            if utcnow() >= deadline:
                with contextlib.suppress(FalError):
                    await fal.cancel(event.data.cancel_url)
                await fail(
                    "timeout", error=f"timed out after {settings.task_timeout_seconds:g}s at the provider"
                )
                return
            try:
                status: QueueStatus = await fal.status(event.data.status_url)
            except FalError as exc:
                if not exc.retryable:
                    await fail("poll", exc)
                    return
                log.warning("status of task %s unavailable: %s", event.task_id, exc.message)
                await asyncio.sleep(settings.poll_interval_max)
                continue
            if status.status == "COMPLETED":
                break
            current = (status.status, status.queue_position if status.status == "IN_QUEUE" else None)
            if current != seen:
                seq += 1
                seen = current
                interval = settings.poll_interval_min
                await bus.publish(
                    TaskStatusChanged(
                        **envelope,
                        data=TaskStatusChangedData(
                            status=status.status,
                            queue_position=current[1],
                            seq=seq,
                        ),
                    )
                )
            else:
                interval = min(interval * 1.5, settings.poll_interval_max)
            await asyncio.sleep(interval)

        if status.error:
            await fail("result", error=status.error)
            return
        try:
            result = await fal.result(event.data.response_url)
        except FalError as exc:
            if exc.retryable:
                raise
            await fail("result", exc)
            return
        images = tuple(
            ProviderImage(
                url=img["url"],
                width=img.get("width"),
                height=img.get("height"),
                content_type=img.get("content_type"),
            )
            for img in result.get("images") or ()
            if isinstance(img, dict) and img.get("url")
        )
        if not images:
            await fail("result", error="the provider returned no images")
            return
        timings = result.get("timings") or {}
        if await bus.has_any(event.task_id, TERMINAL_TOKENS):
            return
        await bus.publish(
            TaskCompleted(
                **envelope,
                data=TaskCompletedData(
                    request_id=event.data.request_id,
                    images=images,
                    seed=result.get("seed"),
                    generation_time=status.inference_time or timings.get("inference"),
                    has_nsfw_concepts=tuple(result.get("has_nsfw_concepts") or ()),
                ),
            )
        )
        log.info("task %s completed with %d image(s)", event.task_id, len(images))


async def _setup(
    settings: Settings, bus: Bus, stack: contextlib.AsyncExitStack
) -> tuple[Consumer, TypedHandler[TaskSubmitted]]:
    fal = FalClient(settings.fal_base_url, settings.fal_key.get_secret_value())
    stack.push_async_callback(fal.aclose)
    await config.follow(settings, bus, stack, fal)
    return consumer(settings, fal), partial(on_submitted, bus=bus, fal=fal, settings=settings)


worker = Worker("poller", TaskSubmitted, _setup)
main = worker.main
