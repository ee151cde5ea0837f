"""The ledger worker: settles a task's credits when it ends, and finishes a job whose gateway died.

It consumes (durable ``ledger``) every terminal task event and every credit ledger subject:

- ``TaskCompleted`` charges the task's hold; ``TaskFailed`` and ``TaskCancelled`` refund it.
  ``credits.settle`` acts only on a task still holding, with the msg id
  ``credits.<task>.settled``: a redelivered terminal event or a second replica finds nothing
  to do, so a task is charged or refunded exactly once.
- ``CreditsHeld``: the gateway publishes the job's ``TaskRequested`` right after the hold. If
  it is still not in the log ``SWEEP_AFTER`` seconds after the hold, the gateway died between
  the two publishes, and this worker publishes the request the hold carries (the same event,
  the same msg id ``<task>.requested``): the job is neither lost nor doubled.

Every message is acked only after its effect is published; a failure is retried (backoff) by
the shared consumer loop, and ledger writes are compare-and-set (see services/common/credits.py).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial

from nats.aio.msg import Msg
from nats.js import api

from schemas.events import CreditsHeld, FluxEvent, TaskCancelled, TaskCompleted, TaskFailed
from services.common import credits
from services.common.bus import Bus
from services.common.consumer import Consumer
from services.common.settings import Settings
from services.common.worker import TypedHandler, Worker

log = logging.getLogger(__name__)

SWEEP_AFTER = 5.0


@dataclass
class LedgerConsumer(Consumer):
    """A ``Consumer`` on several subjects: the terminal task events and every credit ledger."""

    subjects: tuple[str, ...] = field(default_factory=tuple)

    def config(self, bus: Bus) -> api.ConsumerConfig:
        config = super().config(bus)
        config.filter_subject = None
        config.filter_subjects = list(self.subjects)
        return config


def consumer(bus: Bus) -> LedgerConsumer:
    return LedgerConsumer(
        durable="ledger",
        token="*",
        concurrency=256,
        subjects=(
            bus.task_subject("*", TaskCompleted.token),
            bus.task_subject("*", TaskFailed.token),
            bus.task_subject("*", TaskCancelled.token),
            f"{bus.prefix}.credits.>",
        ),
    )


async def on_event(event: FluxEvent, msg: Msg, *, bus: Bus) -> None:
    if isinstance(event, TaskCompleted | TaskFailed | TaskCancelled):
        if await credits.settle(
            bus, event.task_id, event.user_id, succeeded=isinstance(event, TaskCompleted)
        ):
            log.info(
                "task %s: credits %s", event.task_id, "charged" if event.token == "completed" else "refunded"
            )
    elif isinstance(event, CreditsHeld):
        await sweep(event, bus)


async def sweep(held: CreditsHeld, bus: Bus) -> None:
    """Publish the held job's request if its gateway did not within ``SWEEP_AFTER`` seconds."""
    until = held.occurred_at + timedelta(seconds=SWEEP_AFTER)
    if await bus.wait_for_any(held.task_id, ("requested",), until=until, recheck=SWEEP_AFTER):
        return
    log.warning("task %s was held but never requested; publishing the request the hold carries", held.task_id)
    await bus.publish(held.data.request)


async def _setup(
    settings: Settings, bus: Bus, stack: contextlib.AsyncExitStack
) -> tuple[Consumer, TypedHandler[FluxEvent]]:
    return consumer(bus), partial(on_event, bus=bus)


worker = Worker("ledger", FluxEvent, _setup)
main = worker.main
