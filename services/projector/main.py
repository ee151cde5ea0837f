"""The projector: follows the whole task log in order and folds it into PostgreSQL.

It reads with an ordered consumer (no server-side state to manage, gaps detected and healed
by the client) starting right after the checkpoint stored in PostgreSQL, and applies what
arrived in batches of up to ``BATCH`` events per transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats.errors
from nats.js import api
from sqlalchemy.ext.asyncio import AsyncEngine

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
            async with engine.begin() as conn:
                await apply_batch(conn, batch)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def main(settings: Settings, stop: asyncio.Event) -> None:
    bus = await Bus.connect(settings, "projector")
    engine = make_engine(settings)
    try:
        await project(bus, engine, stop)
    finally:
        await engine.dispose()
        await bus.close()
