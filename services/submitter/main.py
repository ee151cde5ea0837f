"""The submitter: ``TaskRequested`` → fal's queue → ``TaskSubmitted`` or ``TaskFailed``.

Concurrency cap without a lock service: the ``TaskRequested`` message is held unacked
(``in_progress`` heartbeats) until the task ends, and the consumer's ``max_ack_pending`` is
``max_concurrent_tasks``. The server therefore lets at most that many tasks be at fal at once
across every submitter replica, first come first served; the rest wait in the stream.

Idempotency: before submitting it looks for the task's ``TaskSubmitted`` (or a terminal
event) in the stream, so a redelivered request is not submitted twice: it resumes waiting.
The one window left is a crash between fal accepting the job and our publish; fal has no
idempotency key, so such a redelivery submits again and the first fal request is orphaned
(the task still has one story).

Cancel: a task cancelled while it waits its turn (PENDING) is acked without being submitted; one
cancelled at fal wakes the hold at once (the terminal ``TaskCancelled``), is cancelled at fal,
and its message is acked, freeing the slot. A redelivered request of a cancelled task asks fal
to cancel again (cancel is idempotent at fal), so a crash between the two never leaks a job.

Bounded submit: one submit, all its retries included, must end within ``submit_budget``, which
is below both the stop grace (``SUBMIT_GRACE``) and the ack wait: a stop never cuts a submit
whose answer we would then lose, and a partition that stops our heartbeats cannot get the
request redelivered to another replica while our submit is still in flight.

Webhooks: with ``FLUXPIPE_WEBHOOK_BASE_URL`` set, the submit carries
``fal_webhook=<base>/api/flux/webhooks/fal/<task>``.

Inputs: the event keeps the image URLs the user gave; our own uploads on local storage, which
fal cannot reach, are read at submit time and sent inline as data URIs (never into an event).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta
from functools import partial

from nats.aio.msg import Msg

from schemas.catalog import MODELS, build_fal_input
from schemas.events import (
    TERMINAL_TOKENS,
    TaskCancelled,
    TaskFailed,
    TaskFailedData,
    TaskRequested,
    TaskSubmitted,
    TaskSubmittedData,
)
from services.common import config
from services.common.bus import Bus, TaskLatest, origin_seq
from services.common.consumer import Consumer, hold
from services.common.ending import fail_dead_lettered
from services.common.fal import FalClient, FalError, QueueHandle
from services.common.settings import Settings
from services.common.storage import Storage, fresh_url, make_storage
from services.common.urls import inline_own_uploads
from services.common.worker import TypedHandler, Worker

log = logging.getLogger(__name__)


SUBMIT_GRACE = 35.0  # one whole fal attempt (30 s timeout): a stop never cuts a submit short


def submit_budget(settings: Settings) -> float:
    """Seconds one submit may take, all retries included: under the stop grace and the ack wait."""
    return min(SUBMIT_GRACE - 5.0, 0.8 * settings.failover_seconds)


def webhook_url(settings: Settings, task_id: str) -> str | None:
    base = settings.webhook_url_base
    return f"{base}/api/flux/webhooks/fal/{task_id}" if base else None


async def cancel_at_fal_if_cancelled(
    bus: Bus, fal: FalClient, task_id: str, latest: TaskLatest | None = None
) -> None:
    """If the task ended by a cancel and it got to fal, cancel it there (idempotent at fal)."""
    latest = latest or await bus.latest(task_id)
    if not isinstance(latest.event("cancelled"), TaskCancelled):
        return
    submitted = latest.event("submitted")
    if not isinstance(submitted, TaskSubmitted):
        return
    try:
        answer = await fal.cancel(submitted.data.cancel_url)
    except FalError as exc:
        log.warning("task %s: cancel at fal failed: %s", task_id, exc.message)
        return
    log.info("task %s cancelled at fal: %s", task_id, answer)


def consumer(settings: Settings, fal: FalClient) -> Consumer:
    return Consumer(
        durable="submitter",
        token="requested",
        ack_wait=settings.failover_seconds,
        max_deliver=6,
        max_ack_pending=settings.max_concurrent_tasks,
        concurrency=settings.max_concurrent_tasks,
        grace=SUBMIT_GRACE,
        on_dead_letter=partial(fail_dead_lettered, fal=fal, stage="submit"),
    )


async def on_requested(
    event: TaskRequested,
    msg: Msg,
    *,
    bus: Bus,
    fal: FalClient,
    settings: Settings,
    max_deliver: int,
    storage: Storage | None = None,
) -> None:
    """Submit the task unless that was done already, then hold its slot until it ends.

    The poller ends every task by ``task_timeout_seconds``; if no terminal event exists
    ``stuck_task_grace_seconds`` after that (the poller dead-lettered it, say), the submitter
    fails the task itself and cancels it at fal, so a lost follow-up never keeps a slot forever.
    """
    if await bus.first_seq(event.task_id, "requested") != origin_seq(msg):
        log.warning("task %s: ignoring a repeated TaskRequested (not the task's first)", event.task_id)
        return
    latest = await bus.latest(event.task_id)
    if latest.has_any(TERMINAL_TOKENS):
        await cancel_at_fal_if_cancelled(bus, fal, event.task_id, latest)
        return
    submitted = latest.event("submitted")
    if submitted is None:
        async with hold(msg, every=settings.failover_seconds / 3, interruptible=False):
            submitted = await submit(event, msg, bus, fal, max_deliver, settings=settings, storage=storage)
        if submitted is None:
            return
    assert isinstance(submitted, TaskSubmitted)
    limit = settings.task_timeout_seconds + settings.stuck_task_grace_seconds
    async with hold(msg, every=settings.failover_seconds / 3):
        if await bus.wait_for_any(
            event.task_id, TERMINAL_TOKENS, until=submitted.occurred_at + timedelta(seconds=limit)
        ):
            await cancel_at_fal_if_cancelled(bus, fal, event.task_id)
            return
        log.error("task %s has no outcome %.0fs after submission; failing it", event.task_id, limit)
        with contextlib.suppress(FalError):
            await fal.cancel(submitted.data.cancel_url)
        await bus.publish(
            TaskFailed.caused_by(
                submitted,
                TaskFailedData(
                    stage="timeout",
                    error=f"no outcome {limit:g}s after submission to the provider; cancelled",
                    request_id=submitted.data.request_id,
                ),
            )
        )


async def submit(
    event: TaskRequested,
    msg: Msg,
    bus: Bus,
    fal: FalClient,
    max_deliver: int,
    *,
    settings: Settings,
    storage: Storage | None = None,
) -> TaskSubmitted | None:
    """Submit to fal and publish the outcome; the ``TaskSubmitted`` if the task is now at fal."""
    envelope = {"task_id": event.task_id, "user_id": event.user_id, "causation_id": event.event_id}
    spec = MODELS.get(event.data.model)
    if spec is None:
        await bus.publish(
            TaskFailed(
                **envelope, data=TaskFailedData(stage="submit", error=f"unknown model {event.data.model}")
            )
        )
        return None
    budget = submit_budget(settings)
    try:
        image_urls = await inline_own_uploads(event.data.image_urls, settings)
        if storage is not None:  # a private bucket's upload: signed afresh for fal, now
            image_urls = tuple(fresh_url(storage, url) for url in image_urls)
    except FileNotFoundError:
        error = "an input image (an upload) is no longer in our storage"
        await bus.publish(TaskFailed(**envelope, data=TaskFailedData(stage="submit", error=error)))
        return None
    try:
        try:
            async with asyncio.timeout(budget):
                handle = await fal.submit(
                    spec.id,
                    build_fal_input(spec, {**event.data.model_dump(), "image_urls": image_urls}),
                    webhook_url=webhook_url(settings, event.task_id),
                )
        except TimeoutError as exc:
            raise FalError(f"the submit to fal took longer than {budget:g}s", retryable=True) from exc
    except FalError as exc:
        if exc.retryable and msg.metadata.num_delivered < max_deliver:
            raise
        await bus.publish(
            TaskFailed(
                **envelope,
                data=TaskFailedData(
                    stage="submit", error=exc.message, error_type=exc.error_type, status_code=exc.status_code
                ),
            )
        )
        return None
    log.info("task %s submitted to fal as %s", event.task_id, handle.request_id)
    submitted = submitted_event(event, handle)
    await bus.publish(submitted)
    return submitted


def submitted_event(requested: TaskRequested, handle: QueueHandle) -> TaskSubmitted:
    """What fal's answer to the submit of ``requested`` means for the log."""
    return TaskSubmitted.caused_by(
        requested,
        TaskSubmittedData(
            request_id=handle.request_id,
            status_url=handle.status_url,
            response_url=handle.response_url,
            cancel_url=handle.cancel_url,
            queue_position=handle.queue_position,
        ),
    )


async def _setup(
    settings: Settings, bus: Bus, stack: contextlib.AsyncExitStack
) -> tuple[Consumer, TypedHandler[TaskRequested]]:
    fal = FalClient(settings.fal_base_url, settings.fal_key.get_secret_value())
    stack.push_async_callback(fal.aclose)
    spec = consumer(settings, fal)
    await config.follow(settings, bus, stack, fal, spec)
    storage = make_storage(settings)
    stack.callback(storage.close)
    handler = partial(
        on_requested, bus=bus, fal=fal, settings=settings, max_deliver=spec.max_deliver, storage=storage
    )
    return spec, handler


worker = Worker("submitter", TaskRequested, _setup)
main = worker.main
