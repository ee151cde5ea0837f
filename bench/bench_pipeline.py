"""Benchmarks with their baselines measured in the same run (run: ``make bench``).

1. Publishing events with an awaited ack: our embedded default (fsync every write) beside the
   nats-server default (fsync every 2 minutes).
2. The projector folding a backlog into PostgreSQL: batches of up to 256 events per
   transaction (ours) beside one event per transaction.

Prints figures only; nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import text

from schemas.events import (
    ImagesStored,
    ImagesStoredData,
    ProviderImage,
    StoredImage,
    TaskCompleted,
    TaskCompletedData,
    TaskRequested,
    TaskRequestedData,
    TaskStatusChanged,
    TaskStatusChangedData,
    TaskSubmitted,
    TaskSubmittedData,
)
from services.common.bus import Bus
from services.common.db import make_engine
from services.common.embedded import EmbeddedNats, EmbeddedPostgres
from services.common.migrate import upgrade
from services.common.settings import Settings
from services.projector import main as projector
from services.projector.main import project


def story(task_id: str) -> list:
    ids = {"task_id": task_id, "user_id": "bench"}
    return [
        TaskRequested(
            **ids, data=TaskRequestedData(model="fal-ai/flux-1/dev", task_type="text_to_image", prompt="p")
        ),
        TaskSubmitted(
            **ids, data=TaskSubmittedData(request_id="r", status_url="s", response_url="r", cancel_url="c")
        ),
        TaskStatusChanged(**ids, data=TaskStatusChangedData(status="IN_PROGRESS", seq=1)),
        TaskCompleted(
            **ids, data=TaskCompletedData(request_id="r", images=(ProviderImage(url="https://x/1.jpg"),))
        ),
        ImagesStored(
            **ids,
            data=ImagesStoredData(
                images=(StoredImage(url="u", key="k", content_type="image/jpeg", width=1, height=1, size=1),)
            ),
        ),
    ]


async def publish_rate(nats_url: str, n: int) -> float:
    settings = Settings(
        NATS_URL=nats_url, FLUXPIPE_STREAM=f"B{uuid.uuid4().hex[:8]}", FLUXPIPE_SUBJECT_PREFIX="b"
    )
    bus = await Bus.connect(settings, "bench")
    events = [e for i in range(n // 5) for e in story(f"t{i}")]
    start = time.perf_counter()
    for event in events:
        await bus.publish(event)
    elapsed = time.perf_counter() - start
    await bus.js.delete_stream(settings.stream_name)
    await bus.close()
    return len(events) / elapsed


async def projector_rate(nats_url: str, db_url: str, tasks: int, batch: int) -> float:
    settings = Settings(
        NATS_URL=nats_url,
        DATABASE_URL=db_url,
        FLUXPIPE_STREAM=f"P{uuid.uuid4().hex[:8]}",
        FLUXPIPE_SUBJECT_PREFIX="p",
    )
    bus = await Bus.connect(settings, "bench")
    for i in range(tasks):
        for event in story(f"t{i}"):
            await bus.js.publish(
                event.subject(bus.prefix), event.model_dump_json().encode(), stream=bus.stream
            )
    last = (await bus.js.stream_info(bus.stream)).state.last_seq
    engine = make_engine(settings)
    async with engine.begin() as conn:
        await conn.execute(text("TRUNCATE flux_tasks, image_history, projector_checkpoints"))
    projector.BATCH = batch
    stop = asyncio.Event()
    start = time.perf_counter()
    runner = asyncio.create_task(project(bus, engine, stop))
    while True:
        async with engine.connect() as conn:
            done = (
                await conn.execute(text("select coalesce(max(stream_seq), 0) from projector_checkpoints"))
            ).scalar()
        if done >= last:
            break
        await asyncio.sleep(0.02)
    elapsed = time.perf_counter() - start
    stop.set()
    await runner
    await engine.dispose()
    await bus.js.delete_stream(settings.stream_name)
    await bus.close()
    return last / elapsed


async def main(events: int, tasks: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        durable = EmbeddedNats.start(root / "nats-sync", sync_always=True)
        lazy = EmbeddedNats.start(root / "nats-default", sync_always=False)
        pg = EmbeddedPostgres.start(root / "pg")
        try:
            await asyncio.to_thread(upgrade, Settings(DATABASE_URL=pg.url))
            fsync = await publish_rate(durable.url, events)
            default = await publish_rate(lazy.url, events)
            print(f"publish, awaited ack, {events} events")
            print(f"  sync_interval=always (ours)     {fsync:9.0f} events/s")
            print(f"  server default (2 min sync)     {default:9.0f} events/s   (baseline)")
            batched = await projector_rate(lazy.url, pg.url, tasks, 256)
            single = await projector_rate(lazy.url, pg.url, tasks, 1)
            print(f"projector catch-up, {tasks} tasks x 5 events")
            print(f"  batches of up to 256 (ours)     {batched:9.0f} events/s")
            print(f"  one event per transaction       {single:9.0f} events/s   (baseline)")
        finally:
            pg.stop()
            durable.stop()
            lazy.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--tasks", type=int, default=2000)
    args = parser.parse_args()
    asyncio.run(main(args.events, args.tasks))
