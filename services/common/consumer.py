"""Durable pull consumers: the loop that feeds a worker's messages to its handler, and ``hold``.

Invariants:
- Every durable consumer is declared here, in code, and applied idempotently at start.
- A handled message is acked only after the handler returned, i.e. after its effect is done
  and its events are published. A handler that raises gets the message redelivered with
  backoff; after ``max_deliver`` attempts (or at once for an undecodable message) it is
  copied to ``<prefix>.dlq.<durable>`` with the reason and terminated. Nothing is dropped
  silently and nothing loops forever.
- On stop, handlers get ``grace`` seconds to finish (those only following a task, inside
  ``hold``, none); the rest are cancelled and their messages nak'd, so another replica takes
  them over at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import nats
from nats.aio.msg import Msg
from nats.js import api
from nats.js.errors import BadRequestError

from schemas.events import FluxEvent, UnknownEvent, decode_event
from services.common.bus import Bus, PermanentError
from services.common.metrics import (
    CONSUMER_ACK_PENDING,
    CONSUMER_PENDING,
    CONSUMER_REDELIVERED,
    EVENTS_FAILED,
    EVENTS_HANDLED,
    IN_FLIGHT,
)

log = logging.getLogger(__name__)


Handler = Callable[[FluxEvent, Msg], Awaitable[None]]

IDLE_POLL, BUSY_POLL = 1.0, 0.1
CRASH_FACTOR = 3


@dataclass
class Consumer:
    """A durable pull consumer and the loop that feeds its messages to one handler.

    ``max_ack_pending`` caps how many messages are in flight across every replica of the
    service; ``concurrency`` caps how many this process handles at once. Long handlers keep
    their message alive with ``in_progress`` heartbeats (see ``hold``).

    ``max_deliver`` is enforced here, not by the server (whose limit is unlimited): a message
    held across restarts is redelivered each time and must never be silently parked by the
    server; a handler that keeps failing is dead-lettered once it reaches ``max_deliver``, and
    ``on_dead_letter`` (if given) is then called with the bus, the event and the reason.
    """

    durable: str
    token: str
    ack_wait: float = 30.0
    max_deliver: int = 10
    max_ack_pending: int = 1000
    concurrency: int = 64
    backoff: tuple[float, ...] = (1, 2, 5, 10, 30)
    grace: float = 5.0
    on_dead_letter: Callable[[Bus, FluxEvent, str], Awaitable[None]] | None = None
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)

    def config(self, bus: Bus) -> api.ConsumerConfig:
        return api.ConsumerConfig(
            durable_name=self.durable,
            name=self.durable,
            filter_subject=bus.task_subject("*", self.token),
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_wait=self.ack_wait,
            max_deliver=-1,
            max_ack_pending=self.max_ack_pending,
        )

    async def ensure(self, bus: Bus) -> None:
        config = self.config(bus)
        try:
            await bus.js.add_consumer(bus.stream, config)
        except BadRequestError:
            info = await bus.js.consumer_info(bus.stream, self.durable)
            merged = info.config
            for key in ("ack_wait", "max_deliver", "max_ack_pending", "filter_subject"):
                setattr(merged, key, getattr(config, key))
            await bus.js.add_consumer(bus.stream, merged)

    def stop(self) -> None:
        self._stopping.set()

    async def serve(self, bus: Bus, handler: Handler, stop: asyncio.Event) -> None:
        """``run`` until ``stop`` is set."""
        runner = asyncio.create_task(self.run(bus, handler))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({runner, stopping}, return_when=asyncio.FIRST_COMPLETED)
        self.stop()
        stopping.cancel()
        await runner

    async def run(self, bus: Bus, handler: Handler) -> None:
        """Fetch and handle messages until ``stop()``; in-flight handlers then get ``grace`` seconds."""
        await self.ensure(bus)
        sub = await bus.js.pull_subscribe_bind(durable=self.durable, stream=bus.stream)
        running: set[asyncio.Task[None]] = set()
        stopping = asyncio.create_task(self._stopping.wait())
        gauges = asyncio.create_task(self._refresh_gauges(bus))
        log.info("consumer %s started on %s", self.durable, bus.task_subject("*", self.token))
        while not self._stopping.is_set():
            room = self.concurrency - len(running)
            if room <= 0:
                # Every slot is taken (possibly by messages held for minutes): wake on a free
                # slot or on stop, never on one alone.
                await asyncio.wait({*running, stopping}, return_when=asyncio.FIRST_COMPLETED)
                continue
            # A pull asks for at most ``room`` messages and a slot freed meanwhile is not
            # refilled until it returns: long-poll only when idle, poll briefly when busy.
            try:
                msgs = await sub.fetch(min(room, 64), timeout=IDLE_POLL if not running else BUSY_POLL)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except Exception:  # connection blips: nats-py reconnects on its own
                log.exception("fetch failed on %s", self.durable)
                await asyncio.sleep(1)
                continue
            for msg in msgs:
                task = asyncio.create_task(self._handle(bus, handler, msg))
                running.add(task)
                task.add_done_callback(running.discard)
        stopping.cancel()
        gauges.cancel()
        for task in [t for t in running if t in _HOLDING]:
            task.cancel()  # only waiting on a task at fal: hand the message back now
        if running:
            loop = asyncio.get_running_loop()
            end, late = loop.time() + self.grace, set(running)
            while True:
                _, late = await asyncio.wait(late, timeout=max(0.0, min(end - loop.time(), 0.1)))
                if not late or loop.time() >= end:
                    break
                for task in [t for t in late if t in _HOLDING]:
                    task.cancel()  # got there during the grace (a submit that just finished)
            for task in late:
                task.cancel()
            await asyncio.gather(*running, *late, return_exceptions=True)
        with contextlib.suppress(Exception):
            await sub.unsubscribe()

    async def _handle(self, bus: Bus, handler: Handler, msg: Msg) -> None:
        delivered = msg.metadata.num_delivered
        try:
            event = decode_event(msg.data)
        except UnknownEvent as exc:
            await self._dead_letter(bus, msg, f"undecodable event: {exc}")
            return
        if delivered > CRASH_FACTOR * self.max_deliver:
            # Far more deliveries than failures allow: the handler never got to fail, so the
            # message is probably killing its worker (restarts also count, hence the margin).
            await self._dead_letter(bus, msg, f"delivered {delivered} times without finishing", event)
            return
        try:
            with IN_FLIGHT.labels(self.durable).track_inprogress():
                await handler(event, msg)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await msg.nak()
            raise
        except PermanentError as exc:
            await self._dead_letter(bus, msg, str(exc), event)
            return
        except Exception as exc:
            if delivered >= self.max_deliver:
                await self._dead_letter(bus, msg, f"gave up after {delivered} deliveries: {exc!r}", event)
                return
            delay = self.backoff[min(delivered, len(self.backoff)) - 1]
            EVENTS_FAILED.labels(self.durable, "retry").inc()
            log.warning(
                "%s failed on %s (delivery %d), retrying in %ss: %r",
                self.durable,
                msg.subject,
                delivered,
                delay,
                exc,
            )
            with contextlib.suppress(Exception):
                await msg.nak(delay=delay)
            return
        with contextlib.suppress(Exception):
            # Not ``ack_sync``: a round trip per message for nothing; an ack lost on the way
            # only means a redelivery, which every handler treats as a no-op.
            await msg.ack()
        EVENTS_HANDLED.labels(self.durable).inc()

    async def _refresh_gauges(self, bus: Bus, every: float = 5.0) -> None:
        """Keep the consumer's lag and pending gauges current (read from the server)."""
        while True:
            await asyncio.sleep(every)
            with contextlib.suppress(Exception):
                info = await bus.js.consumer_info(bus.stream, self.durable)
                CONSUMER_PENDING.labels(self.durable).set(info.num_pending or 0)
                CONSUMER_ACK_PENDING.labels(self.durable).set(info.num_ack_pending or 0)
                CONSUMER_REDELIVERED.labels(self.durable).set(info.num_redelivered or 0)

    async def _dead_letter(self, bus: Bus, msg: Msg, reason: str, event: FluxEvent | None = None) -> None:
        """Park the message with the reason, then let ``on_dead_letter`` end its task (a task
        whose next step was dead-lettered must not stay unfinished forever)."""
        EVENTS_FAILED.labels(self.durable, "dead_letter").inc()
        await bus.dead_letter(self.durable, msg.subject, msg.metadata.sequence.stream, msg.data, reason)
        if event is not None and self.on_dead_letter is not None:
            try:
                await self.on_dead_letter(bus, event, reason)
            except Exception:
                # Redo it all later (the dead letter is de-duplicated by its msg id): ending the
                # task must not be lost to a blip.
                log.exception("%s could not end task %s after dead-lettering it", self.durable, event.task_id)
                with contextlib.suppress(Exception):
                    await msg.nak(delay=self.backoff[-1])
                return
        await msg.term()


_HOLDING: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()


@contextlib.asynccontextmanager
async def hold(msg: Msg, every: float, *, interruptible: bool = True) -> AsyncIterator[None]:
    """Keep ``msg`` from being redelivered while a long effect runs (``in_progress`` heartbeats).

    An ``interruptible`` body must be safe to cut short and redo (it follows a task; its
    publishes are idempotent): a stopping ``Consumer`` cancels it at once, without ``grace``,
    and its message goes straight to another replica. Anything else (a submit to fal) gets
    the grace period to finish.
    """

    async def beat() -> None:
        while True:
            await asyncio.sleep(every)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    current = asyncio.current_task() if interruptible else None
    if current is not None:
        _HOLDING.add(current)
    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        if current is not None:
            _HOLDING.discard(current)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
