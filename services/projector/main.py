"""The projector: follows the whole task log in order and folds it into PostgreSQL.

It reads every event subject of the stream (``<prefix>.>``; dead letters are skipped) with an
ordered consumer (no server-side state to manage, gaps detected and healed
by the client) starting right after the checkpoint stored in PostgreSQL, and applies what
arrived in batches of up to ``BATCH`` events per transaction. A batch waits up to ``LINGER``
after its first event for more: a transaction costs about the same for one event as for
dozens, so under load the read model trails the log by at most that much more, for a
fraction of the CPU per event (docs/BENCHMARKS.md).

Invariants:
- Exactly-once effect: the checkpoint moves in the same transaction as the rows it covers.
- Nothing is skipped for a reason that is not the event's own. A database that is down,
  full, read-only or refuses us pauses the projector (the batch is retried with backoff,
  interruptibly) instead of dead-lettering good events.
- An event that can never be applied (its data breaks a constraint, or folding it raises)
  is dead-lettered to ``<prefix>.dlq.projector`` with the reason and the checkpoint moves
  past it, so one bad event never stops every other task's projection. ``BREAKER`` such
  events in a row look like a bug, not bad data: the projector pauses instead.
- Undecodable events (an unknown type, a newer version) are dead-lettered the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from schemas.events import FluxEvent, UnknownEvent, decode_event
from services.common.bus import Bus, is_redrive
from services.common.db import make_engine
from services.common.metrics import (
    PROJECTOR_APPLIED,
    PROJECTOR_DEAD_LETTERS,
    projector_position,
    serving_metrics,
)
from services.common.settings import Settings
from services.projector.projection import apply_batch, load_checkpoint

log = logging.getLogger(__name__)
T = TypeVar("T")

BATCH = 256
LINGER = 0.02  # seconds a batch waits for more events after its first
DURABLE = "projector"
REDRIVEN = "redriven copy"  # stands for the subject of a re-driven copy: skipped like a dead letter


Raw = tuple[int, str, bytes]  # stream seq, subject, data

# SQLSTATE classes that are the event's fault: data exceptions, integrity violations,
# program limits (a value too large). Anything else from the database is its state, not the
# event's (down, full, read-only, no privilege, a lock): the projector pauses and retries.
EVENT_FAULTS = ("22", "23", "54")
BREAKER = 10  # this many unprojectable events in a row look like a bug, not bad data: pause


class Pause(Exception):
    """Projecting cannot go on for a reason that is not the event's: retry the batch later."""


@dataclass
class Projector:
    bus: Bus
    engine: AsyncEngine
    stop: asyncio.Event
    parked_in_a_row: int = 0
    applied_seq: int = 0

    async def run(self) -> None:
        start = await self.retrying(self.checkpoint) + 1
        sub = await self.bus.js.subscribe(
            self.bus.events_subject(),
            stream=self.bus.stream,
            ordered_consumer=True,
            config=api.ConsumerConfig(
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start
            ),
        )
        log.info("projector following %s from stream seq %d", self.bus.events_subject(), start)
        self.applied_seq = start - 1
        watching = asyncio.create_task(self.watch_lag())
        try:
            while not self.stop.is_set():
                try:
                    first = await sub.next_msg(timeout=0.5)
                except nats.errors.TimeoutError:
                    continue
                msgs = await self.fill([first], sub)
                raws = [
                    (m.metadata.sequence.stream, REDRIVEN if is_redrive(m.headers) else m.subject, m.data)
                    for m in msgs
                ]
                try:
                    await self.retrying(partial(self.apply, raws))
                except Pause:
                    return  # stopped during an outage: nothing was lost, the checkpoint says where
                last = msgs[-1].metadata
                self.applied_seq = last.sequence.stream
                projector_position(self.applied_seq, self.applied_seq + last.num_pending)
        finally:
            watching.cancel()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def fill(self, msgs: list[Msg], sub: JetStreamContext.PushSubscription) -> list[Msg]:
        """Add to ``msgs`` what is pending, and what arrives within ``LINGER``, up to ``BATCH``."""
        loop = asyncio.get_running_loop()
        until = loop.time() + LINGER
        while len(msgs) < BATCH:
            left = 1.0 if sub.pending_msgs > 0 else until - loop.time()
            if left <= 0:
                break
            try:
                msgs.append(await sub.next_msg(timeout=left))
            except nats.errors.TimeoutError:
                break
        return msgs

    async def watch_lag(self, every: float = 5.0) -> None:
        """Keep the lag gauges honest while no batch lands (idle, or paused by an outage)."""
        while True:
            await asyncio.sleep(every)
            with contextlib.suppress(Exception):
                last_seq = (await self.bus.js.stream_info(self.bus.stream)).state.last_seq
                oldest = None
                if last_seq > self.applied_seq:
                    oldest = (
                        await self.bus.js.get_msg(
                            self.bus.stream,
                            seq=self.applied_seq + 1,
                            subject=self.bus.events_subject(),
                            next=True,
                        )
                    ).time
                projector_position(self.applied_seq, last_seq, oldest)

    async def retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """``attempt()`` until it succeeds, pausing with backoff (0.2 s doubling to 10 s) while
        it raises ``Pause``; raises ``Pause`` if ``stop`` is set meanwhile."""
        tries = 0
        while True:
            try:
                return await attempt()
            except Pause as exc:
                tries += 1
                log.warning("projector paused (attempt %d): %s", tries, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self.stop.wait(), min(0.2 * 2 ** (tries - 1), 10.0) * random.uniform(0.8, 1.2)
                )
            if self.stop.is_set():
                raise Pause("stopped")

    async def checkpoint(self) -> int:
        try:
            async with self.engine.begin() as conn:
                return await load_checkpoint(conn)
        except Exception as exc:
            raise Pause(f"cannot read the checkpoint: {exc!r}") from exc

    async def apply(self, raws: list[Raw]) -> None:
        """Apply one batch of stream messages (see the module's invariants). Restartable: every
        step moves the checkpoint in its own transaction, and dead letters are de-duplicated
        by stream sequence, so a retry after ``Pause`` redoes only what is not done."""
        batch: list[tuple[int, FluxEvent]] = []
        where = {seq: (subject, data) for seq, subject, data in raws}
        for seq, subject, data in raws:
            if self.bus.is_dead_letter(subject) or subject == REDRIVEN:
                continue  # parked copies of events, not events: the checkpoint just moves past
            try:
                batch.append((seq, decode_event(data)))
            except UnknownEvent as exc:
                await self.park(seq, subject, data, f"undecodable event: {exc}")
        try:
            if applied := await self.write(batch, last_seq=raws[-1][0]):
                self.parked_in_a_row = 0
                PROJECTOR_APPLIED.inc(applied)
            return
        except EventFault as exc:
            log.error("a batch of %d event(s) failed; applying them one by one: %s", len(batch), exc)
        for seq, event in batch:
            try:
                if await self.write([(seq, event)]):  # 0 when a retry meets it done already
                    self.parked_in_a_row = 0
                    PROJECTOR_APPLIED.inc()
            except EventFault as exc:
                if self.parked_in_a_row >= BREAKER:
                    raise Pause(f"{BREAKER} events in a row could not be projected: a bug? ({exc})") from exc
                subject, data = where[seq]
                await self.park(seq, subject, data, f"cannot be projected: {exc}")
                await self.write([], last_seq=seq)
        await self.write([], last_seq=raws[-1][0])

    async def write(self, batch: list[tuple[int, FluxEvent]], last_seq: int = 0) -> int:
        """One transaction; how many events it applied. ``EventFault`` if an event in it is at
        fault, ``Pause`` for anything else."""
        try:
            async with self.engine.begin() as conn:
                return await apply_batch(conn, batch, last_seq=last_seq)
        except DBAPIError as exc:
            state = str(getattr(exc.orig, "sqlstate", "") or "")
            if state[:2] in EVENT_FAULTS:
                raise EventFault(f"{state}: {exc.orig}") from exc
            raise Pause(f"the database refused the batch ({state or 'no sqlstate'}): {exc.orig}") from exc
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            raise Pause(f"the database is unreachable: {exc!r}") from exc
        except Exception as exc:  # folding raised: this code cannot apply that event
            raise EventFault(repr(exc)) from exc

    async def park(self, seq: int, subject: str, data: bytes, reason: str) -> None:
        self.parked_in_a_row += 1
        PROJECTOR_DEAD_LETTERS.inc()
        try:
            await self.bus.dead_letter(DURABLE, subject, seq, data, reason[:1000])
        except Exception as exc:
            raise Pause(f"cannot dead-letter stream seq {seq}: {exc!r}") from exc


class EventFault(Exception):
    """An event in the transaction can never be applied (its data, or a bug folding it)."""


async def project(bus: Bus, engine: AsyncEngine, stop: asyncio.Event) -> None:
    await Projector(bus, engine, stop).run()


async def main(settings: Settings, stop: asyncio.Event) -> None:
    bus = await Bus.connect(settings, "projector")
    engine = make_engine(settings)
    try:
        async with serving_metrics(settings, DURABLE):
            await project(bus, engine, stop)
    finally:
        await engine.dispose()
        await bus.close()
