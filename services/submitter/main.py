"""The submitter: ``TaskRequested`` → fal's queue → ``TaskSubmitted`` or ``TaskFailed``.

Idempotency: before submitting it looks for the task's ``TaskSubmitted`` (or a terminal
event) in the stream, so a redelivered request is not submitted twice. The one window left
is a crash between fal accepting the job and our publish; fal has no idempotency key, so
such a redelivery submits again and the first fal request is orphaned (never charged to the
user twice: the task has one story). Ack happens after the outcome event is published.
"""

from __future__ import annotations

import asyncio
import logging

from nats.aio.msg import Msg

from schemas.catalog import MODELS, build_fal_input
from schemas.events import (
    FluxEvent,
    TaskFailed,
    TaskFailedData,
    TaskRequested,
    TaskSubmitted,
    TaskSubmittedData,
)
from services.common.bus import Bus, Consumer
from services.common.fal import FalClient, FalError
from services.common.settings import Settings

log = logging.getLogger(__name__)

TERMINAL_TOKENS = ("completed", "failed", "cancelled")


def consumer(settings: Settings) -> Consumer:
    return Consumer(durable="submitter", token="requested", ack_wait=60, max_deliver=6, concurrency=32)


async def already_handled(bus: Bus, task_id: str, tokens: tuple[str, ...]) -> bool:
    for token in tokens:
        if await bus.last_event(task_id, token) is not None:
            return True
    return False


async def on_requested(event: TaskRequested, msg: Msg, *, bus: Bus, fal: FalClient, max_deliver: int) -> None:
    if await already_handled(bus, event.task_id, ("submitted", *TERMINAL_TOKENS)):
        return
    envelope = {"task_id": event.task_id, "user_id": event.user_id, "causation_id": event.event_id}
    spec = MODELS.get(event.data.model)
    if spec is None:
        await bus.publish(
            TaskFailed(
                **envelope, data=TaskFailedData(stage="submit", error=f"unknown model {event.data.model}")
            )
        )
        return
    try:
        handle = await fal.submit(spec.id, build_fal_input(spec, event.data.model_dump()))
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
        return
    log.info("task %s submitted to fal as %s", event.task_id, handle.request_id)
    await bus.publish(
        TaskSubmitted(
            **envelope,
            data=TaskSubmittedData(
                request_id=handle.request_id,
                status_url=handle.status_url,
                response_url=handle.response_url,
                cancel_url=handle.cancel_url,
                queue_position=handle.queue_position,
            ),
        )
    )


async def main(settings: Settings, stop: asyncio.Event) -> None:
    bus = await Bus.connect(settings, "submitter")
    fal = FalClient(settings.fal_base_url, settings.fal_key.get_secret_value())
    spec = consumer(settings)

    async def handle(event: FluxEvent, msg: Msg) -> None:
        assert isinstance(event, TaskRequested)
        await on_requested(event, msg, bus=bus, fal=fal, max_deliver=spec.max_deliver)

    try:
        await spec.serve(bus, handle, stop)
    finally:
        await fal.aclose()
        await bus.close()
