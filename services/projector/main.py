"""The projector: follows the whole task log in order and folds it into PostgreSQL.

It reads with an ordered consumer (no server-side state to manage, gaps detected and healed
by the client) starting right after the checkpoint stored in PostgreSQL, and applies what
arrived in batches of up to ``BATCH`` events per transaction. A database outage pauses it
(the batch is retried until it applies); an event that can never be applied is
dead-lettered with the reason instead of stopping every other task's projection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats.errors
from nats.js import api
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from schemas.events import FluxEvent, UnknownEvent, decode_event
from services.common.bus import Bus
from services.common.db import make_engine
from services.common.settings import Settings
from services.projector.projection import apply_batch, load_checkpoint

log = logging.getLogger(__name__)

BATCH = 256
DURABLE = "projector"


Raw = tuple[int, str, bytes]  # stream seq, subject, data


async def project(bus: Bus, engine: AsyncEngine, stop: asyncio.Event) -> None:
    async with engine.begin() as conn:
        start = await load_checkpoint(conn) + 1
    sub = await bus.js.subscribe(
        bus.task_subject(),
        stream=bus.stream,
        ordered_consumer=True,
        config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start),
    )
    log.info("projector following %s from stream seq %d", bus.task_subject(), start)
    try:
        while not stop.is_set():
            try:
                first = await sub.next_msg(timeout=0.5)
            except nats.errors.TimeoutError:
                continue
            msgs = [first]
            while len(msgs) < BATCH and sub.pending_msgs > 0:
                msgs.append(await sub.next_msg(timeout=1))
            raws = [(m.metadata.sequence.stream, m.subject, m.data) for m in msgs]
            if not await apply_until_done(bus, engine, raws, stop):
                return
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def apply_until_done(bus: Bus, engine: AsyncEngine, raws: list[Raw], stop: asyncio.Event) -> bool:
    """Apply one batch of stream messages, whatever happens, until it is in; False if ``stop``
    came first.

    - While the database does not answer, the batch is retried with backoff (up to 10 s):
      an outage pauses the projection and loses nothing.
    - If it answers and the batch still fails, an event in it cannot be applied (bad data, a
      bug): the batch is applied event by event and each such event is dead-lettered to
      ``<prefix>.dlq.projector`` with the reason, so one event never stops the rest.
    - An event that cannot be decoded (unknown type or version) is dead-lettered the same way.
    A retry cannot double anything: the checkpoint moves in each batch's own transaction.
    """
    batch: list[tuple[int, FluxEvent]] = []
    for seq, subject, data in raws:
        try:
            batch.append((seq, decode_event(data)))
        except UnknownEvent as exc:
            await bus.dead_letter(DURABLE, subject, seq, data, f"undecodable event: {exc}")
    retrying = AsyncRetrying(
        retry=retry_if_exception_type(DatabaseDown),
        wait=wait_exponential_jitter(multiplier=0.2, max=10, jitter=0.2),
        stop=lambda _: stop.is_set(),
        before_sleep=lambda state: log.warning(
            "the database is unreachable; retrying %d event(s) (attempt %d)", len(raws), state.attempt_number
        ),
        reraise=True,
    )
    try:
        async for attempt in retrying:
            with attempt:
                await apply_or_isolate(bus, engine, raws, batch)
    except DatabaseDown:
        if stop.is_set():
            return False
        raise
    return True


class DatabaseDown(Exception):
    pass


async def apply_or_isolate(
    bus: Bus, engine: AsyncEngine, raws: list[Raw], batch: list[tuple[int, FluxEvent]]
) -> None:
    try:
        async with engine.begin() as conn:
            await apply_batch(conn, batch, last_seq=raws[-1][0])
        return
    except Exception as exc:
        if not await database_answers(engine):
            log.warning("projecting failed, the database does not answer: %r", exc)
            raise DatabaseDown from exc
        log.error("a batch of %d event(s) failed; applying them one by one: %r", len(batch), exc)
    where = {seq: (subject, data) for seq, subject, data in raws}
    for seq, event in batch:
        try:
            async with engine.begin() as conn:
                await apply_batch(conn, [(seq, event)])
        except Exception as exc:
            if not await database_answers(engine):
                raise DatabaseDown from exc
            subject, data = where[seq]
            await bus.dead_letter(DURABLE, subject, seq, data, f"cannot be projected: {exc!r}"[:1000])
            async with engine.begin() as conn:
                await apply_batch(conn, [], last_seq=seq)
    async with engine.begin() as conn:
        await apply_batch(conn, [], last_seq=raws[-1][0])


async def database_answers(engine: AsyncEngine) -> bool:
    try:
        async with asyncio.timeout(5), engine.connect() as conn:
            await conn.execute(text("select 1"))
    except Exception:
        return False
    return True


async def main(settings: Settings, stop: asyncio.Event) -> None:
    bus = await Bus.connect(settings, "projector")
    engine = make_engine(settings)
    try:
        await project(bus, engine, stop)
    finally:
        await engine.dispose()
        await bus.close()
