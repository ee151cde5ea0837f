"""The poller: follows a submitted task at fal until it ends.

``TaskSubmitted`` → ``TaskStatusChanged``… → ``TaskCompleted`` | ``TaskFailed``.

Invariants:
- The ``TaskSubmitted`` message is held unacked (``in_progress`` heartbeats) while the task
  is followed, and acked only after the terminal event is published: a crashed poller's
  tasks are redelivered to another replica, which resumes from the stream.
- One event per change, never one per poll; the n-th status change has msg id
  ``<task>.status.<n>``, and a resumed poller continues n from the last stored status event.
- Polling is adaptive: ``poll_interval_min`` after a change, growing ×1.5 to
  ``poll_interval_max`` while nothing changes. With webhooks configured, polling is only the
  fallback and runs at ``poll_interval_max``.
- A verified webhook (``WebhookReceived``, published by the gateway) or any terminal event
  (a cancel) ends the wait at once: the poller is woken by a live subscription to the task's
  subjects, and also reads a webhook already stored when it starts (one that arrived while no
  poller ran). A webhook for another fal request than the task's is ignored.
- A task ends once: the terminal events share the msg id ``<task>.end``, and the poller looks
  for one before publishing, so a webhook and a poll racing each other publish one outcome.
- Deadline: ``task_timeout_seconds`` after submission. fal is always asked once more before
  the task is failed, so a job that finished while no poller ran is collected, not thrown
  away; only a job still unfinished is then cancelled at fal (best effort) and failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta
from functools import partial
from typing import Any

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
    WebhookReceived,
    utcnow,
)
from services.common import config
from services.common.bus import Bus, TaskLatest
from services.common.consumer import Consumer, hold
from services.common.ending import fail_dead_lettered
from services.common.fal import FalClient, FalError, QueueStatus, describe_error_body
from services.common.settings import Settings
from services.common.worker import TypedHandler, Worker

log = logging.getLogger(__name__)

WAKE_TOKENS = (*TERMINAL_TOKENS, "webhook")


def consumer(settings: Settings, fal: FalClient) -> Consumer:
    return Consumer(
        durable="poller",
        token="submitted",
        ack_wait=settings.failover_seconds,
        max_deliver=20,
        concurrency=500,
        on_dead_letter=partial(fail_dead_lettered, fal=fal, stage="poll"),
    )


def completion(
    output: dict[str, Any], request_id: str, inference_time: float | None
) -> TaskCompletedData | None:
    """The ``TaskCompleted`` payload for a model's output, or None if it holds no image."""
    images = tuple(
        ProviderImage(
            url=img["url"],
            width=img.get("width"),
            height=img.get("height"),
            content_type=img.get("content_type"),
        )
        for img in output.get("images") or ()
        if isinstance(img, dict) and isinstance(img.get("url"), str) and img.get("url")
    )
    if not images:
        return None
    timings = output.get("timings") or {}
    nsfw = output.get("has_nsfw_concepts") or ()
    return TaskCompletedData(
        request_id=request_id,
        images=images,
        seed=output.get("seed") if isinstance(output.get("seed"), int) else None,
        generation_time=inference_time or (timings.get("inference") if isinstance(timings, dict) else None),
        has_nsfw_concepts=tuple(bool(x) for x in nsfw) if isinstance(nsfw, list | tuple) else (),
    )


async def on_submitted(
    event: TaskSubmitted, msg: Msg, *, bus: Bus, fal: FalClient, settings: Settings
) -> None:
    envelope = {"task_id": event.task_id, "user_id": event.user_id, "causation_id": event.event_id}
    request_id = event.data.request_id

    async def fail(
        stage: FailureStage,
        exc: FalError | None = None,
        error: str | None = None,
        error_type: str | None = None,
    ) -> None:
        if await bus.has_any(event.task_id, TERMINAL_TOKENS):
            return  # ended meanwhile (a cancel, the submitter's backstop): a task ends once
        await bus.publish(
            TaskFailed(
                **envelope,
                data=TaskFailedData(
                    stage=stage,
                    error=error or (exc.message if exc else "failed"),
                    error_type=exc.error_type if exc else error_type,
                    status_code=exc.status_code if exc else None,
                    request_id=request_id,
                ),
            )
        )

    async def complete(data: TaskCompletedData | None) -> None:
        if data is None:
            await fail("result", error="the provider returned no images")
            return
        if await bus.has_any(event.task_id, TERMINAL_TOKENS):
            return
        await bus.publish(TaskCompleted(**envelope, data=data))
        log.info("task %s completed with %d image(s)", event.task_id, len(data.images))

    async def collect(inference_time: float | None) -> None:
        """GET the result of a COMPLETED request and publish the outcome."""
        try:
            result = await fal.result(event.data.response_url)
        except FalError as exc:
            if exc.retryable:
                raise
            await fail("result", exc)
            return
        await complete(completion(result, request_id, inference_time))

    async def settled_by_webhook(known: TaskLatest | None = None) -> bool:
        """Finish from a stored webhook for this request, if there is one; True if finished."""
        hook = (known or await bus.latest(event.task_id)).event("webhook")
        if not isinstance(hook, WebhookReceived):
            return False
        if hook.data.request_id != request_id:
            log.warning("task %s: ignoring a webhook for fal request %s", event.task_id, hook.data.request_id)
            return False
        if hook.data.status == "ERROR":
            message, error_type = describe_error_body(hook.data.payload)
            await fail(
                "result",
                error=message or hook.data.error or "the provider reported an error",
                error_type=error_type,
            )
        elif hook.data.payload is None:
            await collect(None)  # fal could not put the output in the webhook (payload_error)
        else:
            await complete(completion(hook.data.payload, request_id, None))
        return True

    async def follow(latest: TaskLatest, woken: asyncio.Event) -> None:
        """Poll fal until the request ends, or until the task is ended some other way."""
        last = latest.event("status")
        seq = last.data.seq if isinstance(last, TaskStatusChanged) else 0
        seen = (
            (last.data.status, last.data.queue_position)
            if isinstance(last, TaskStatusChanged)
            else ("IN_QUEUE", event.data.queue_position)
        )
        deadline = event.occurred_at + timedelta(seconds=settings.task_timeout_seconds)
        base = settings.poll_interval_max if settings.webhook_url_base else settings.poll_interval_min
        interval = base

        async def pause(seconds: float) -> bool:
            """Wait ``seconds`` (never past the deadline) unless woken; True if the task was
            ended meanwhile (a terminal event, or a webhook this call turned into one)."""
            left = (deadline - utcnow()).total_seconds()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), max(0.0, min(seconds, left)))
            if not woken.is_set():
                return False
            woken.clear()
            now = await bus.latest(event.task_id)
            return now.has_any(TERMINAL_TOKENS) or await settled_by_webhook(now)

        while True:
            try:
                status: QueueStatus = await fal.status(event.data.status_url)
            except FalError as exc:
                if not exc.retryable:
                    await fail("poll", exc)
                    return
                if utcnow() >= deadline:
                    with contextlib.suppress(FalError):
                        await fal.cancel(event.data.cancel_url)
                    limit = settings.task_timeout_seconds
                    await fail("timeout", exc, error=f"timed out after {limit:g}s: {exc.message}")
                    return
                log.warning("status of task %s unavailable: %s", event.task_id, exc.message)
                if await pause(settings.poll_interval_max):
                    return
                continue
            if status.status == "COMPLETED":
                if status.error:
                    await fail("result", error=status.error, error_type=status.error_type)
                    return
                await collect(status.inference_time)
                return
            if utcnow() >= deadline:
                with contextlib.suppress(FalError):
                    await fal.cancel(event.data.cancel_url)
                await fail(
                    "timeout", error=f"timed out after {settings.task_timeout_seconds:g}s at the provider"
                )
                return
            current = (status.status, status.queue_position if status.status == "IN_QUEUE" else None)
            if current != seen:
                seq += 1
                seen = current
                interval = base
                await bus.publish(
                    TaskStatusChanged(
                        **envelope,
                        data=TaskStatusChangedData(status=status.status, queue_position=current[1], seq=seq),
                    )
                )
            else:
                interval = min(interval * 1.5, settings.poll_interval_max)
            if await pause(interval):
                return

    async with (
        hold(msg, every=settings.failover_seconds / 3),
        bus.watching(event.task_id, WAKE_TOKENS) as woken,
    ):
        # Read once the watch is live: an event stored before it woke no one.
        latest = await bus.latest(event.task_id)
        if latest.has_any(TERMINAL_TOKENS) or await settled_by_webhook(latest):
            return
        await follow(latest, woken)


async def _setup(
    settings: Settings, bus: Bus, stack: contextlib.AsyncExitStack
) -> tuple[Consumer, TypedHandler[TaskSubmitted]]:
    fal = FalClient(settings.fal_base_url, settings.fal_key.get_secret_value())
    stack.push_async_callback(fal.aclose)
    await config.follow(settings, bus, stack, fal)
    return consumer(settings, fal), partial(on_submitted, bus=bus, fal=fal, settings=settings)


worker = Worker("poller", TaskSubmitted, _setup)
main = worker.main
