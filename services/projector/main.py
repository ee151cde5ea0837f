"""The projector: follows the whole task log in order and folds it into PostgreSQL.

It reads with an ordered consumer (no server-side state to manage, gaps detected and healed
by the client) starting right after the checkpoint stored in PostgreSQL, and applies what
arrived in batches of up to ``BATCH`` events per transaction. A database outage pauses it
(the batch is retried until it applies); it never skips an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats.errors
from nats.js import api
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from schemas.events import FluxEvent, UnknownEvent, decode_event
from services.common.bus import Bus
from services.common.db import make_engine
from services.common.settings import Settings
from services.projector.projection import apply_batch, load_checkpoint

log = logging.getLogger(__name__)

BATCH = 256


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
            batch: list[tuple[int, FluxEvent]] = []
            for msg in msgs:
                seq = msg.metadata.sequence.stream
                try:
                    batch.append((seq, decode_event(msg.data)))
                except UnknownEvent as exc:
                    log.error("skipping undecodable event at stream seq %d (%s): %s", seq, msg.subject, exc)
            if not await apply_until_done(engine, batch, stop):
                return
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def apply_until_done(
    engine: AsyncEngine, batch: list[tuple[int, FluxEvent]], stop: asyncio.Event
) -> bool:
    """Apply one batch, retrying through database outages (backoff up to 10 s) until it is in.

    Never skips: the read model must hold every event. A retry cannot double anything, since
    the checkpoint moves in the batch's own transaction. False if ``stop`` came first.
    """
    retrying = AsyncRetrying(
        retry=retry_if_exception_type((SQLAlchemyError, OSError)),
        wait=wait_exponential_jitter(multiplier=0.2, max=10, jitter=0.2),
        stop=lambda _: stop.is_set(),
        before_sleep=lambda state: log.warning(
            "projecting %d event(s) failed (attempt %d), retrying: %r",
            len(batch),
            state.attempt_number,
            state.outcome.exception() if state.outcome else None,
        ),
        reraise=True,
    )
    try:
        async for attempt in retrying:
            with attempt:
                async with engine.begin() as conn:
                    await apply_batch(conn, batch)
    except (SQLAlchemyError, OSError):
        if stop.is_set():
            return False
        raise
    return True


async def main(settings: Settings, stop: asyncio.Event) -> None:
    bus = await Bus.connect(settings, "projector")
    engine = make_engine(settings)
    try:
        await project(bus, engine, stop)
    finally:
        await engine.dispose()
        await bus.close()
