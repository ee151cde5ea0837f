"""``fluxpipe replay`` at scale, with its baseline measured in the same run.

Publishes ``--events`` events (tasks of five events each: requested, submitted, status,
completed, stored) into a fresh stream, then:

1. ``replay``: read from seq 1, fold in memory (in worker processes too, see
   ``--workers``), COPY into shadow tables, build the indexes, swap: events per second over
   the whole run, each phase's time, and the CPU seconds of the replay and its workers
   (the machine may be shared: events per CPU-second and the load average say how much).
2. Baseline: a plain PostgreSQL COPY of the same rows (the replay's final ``flux_tasks`` and
   ``image_history`` rows) into unindexed tables: rows per second, the floor any rebuild
   that writes these rows pays.

Uses NATS_URL / DATABASE_URL when set, else embedded servers (nats-server default sync).
Prints figures only; nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import resource
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg

from bench.bench_pipeline import story
from services.common.bus import Bus
from services.common.embedded import EmbeddedNats, EmbeddedPostgres
from services.common.migrate import upgrade
from services.common.settings import Settings
from services.projector.replay import replay
from services.projector.shadow import table_columns


async def publish(bus: Bus, events: int) -> float:
    """Publish ``events`` events without awaiting each ack (core publish, then a flush)."""
    start = time.perf_counter()
    sent = 0
    task = 0
    while sent < events:
        for event in story(f"task{task:08d}"):
            if sent >= events:
                break
            await bus.nc.publish(
                event.subject(bus.prefix),
                event.model_dump_json().encode(),
                headers={"Nats-Msg-Id": event.msg_id},
            )
            sent += 1
        task += 1
        if task % 2000 == 0:
            await bus.nc.flush(timeout=60)
    await bus.nc.flush(timeout=60)
    deadline = time.monotonic() + 300
    while (stored := (await bus.js.stream_info(bus.stream)).state.messages) < events:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the stream holds {stored} of {events} events after 5 minutes")
        await asyncio.sleep(0.1)
    return time.perf_counter() - start


def _cpu() -> float:
    """CPU seconds of this process and of its finished children (the replay's workers; the
    embedded servers are still running, so not counted)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


async def plain_copy(dsn: str) -> tuple[int, float]:
    """COPY the rows the replay wrote (read back, not timed) into unindexed scratch tables:
    (rows, seconds)."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = 0
        elapsed = 0.0
        for table in ("flux_tasks", "image_history"):
            scratch = f"bench_copy_{table}"
            columns = [n for n, _ in await table_columns(conn, table)]
            records = [tuple(r) for r in await conn.fetch(f"select * from {table}")]
            await conn.execute(f"drop table if exists {scratch}")
            await conn.execute(f"create table {scratch} (like {table} including defaults)")
            start = time.perf_counter()
            await conn.copy_records_to_table(scratch, records=records, columns=columns)
            elapsed += time.perf_counter() - start
            rows += len(records)
            await conn.execute(f"drop table {scratch}")
        return rows, elapsed
    finally:
        await conn.close()


async def run(nats_url: str, db_url: str, events: int, profile: bool, workers: list[int | None]) -> None:
    settings = Settings(
        NATS_URL=nats_url,
        DATABASE_URL=db_url,
        FLUXPIPE_STREAM=f"R{uuid.uuid4().hex[:8]}",
        FLUXPIPE_SUBJECT_PREFIX=f"r{uuid.uuid4().hex[:6]}",
    )
    bus = await Bus.connect(settings, "bench")
    try:
        took = await publish(bus, events)
        print(f"published {events:,} events in {took:.1f}s ({events / took:,.0f}/s)")
        for n in workers:  # each replays the same stream (the later ones replace equal tables)
            await replay_once(settings, bus, profile, n)
    finally:
        await bus.js.delete_stream(settings.stream_name)
        await bus.close()


async def replay_once(settings: Settings, bus: Bus, profile: bool, workers: int | None) -> None:
    profiler = cProfile.Profile() if profile else None
    load = os.getloadavg()[0]
    cpu = _cpu()
    if profiler is not None:
        profiler.enable()
    result = await replay(settings, bus, workers=workers)
    if profiler is not None:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    cpu = _cpu() - cpu
    rows = sum(result.rows.values())
    print(
        f"replay of {result.events:,} events into {rows:,} rows "
        f"({cpu:.1f}s of CPU in the replay and its workers: {result.events / cpu:,.0f} events per "
        f"CPU-second; load average {load:.1f} before, {os.getloadavg()[0]:.1f} after)"
    )
    copied, seconds = await plain_copy(settings.asyncpg_dsn)
    read_rate = result.events / result.read_seconds
    table = [
        ("whole replay (ours)", f"{result.events_per_second:,.0f} events/s", f"{result.seconds:.1f}s"),
        (
            f"  read + fold ({result.workers} processes)",
            f"{read_rate:,.0f} events/s",
            f"{result.read_seconds:.1f}s",
        ),
        ("  COPY + indexes + catch-up", "", f"{result.load_seconds:.1f}s"),
        ("  swap", "", f"{result.swap_seconds * 1000:.0f}ms"),
        ("plain COPY of the same rows (baseline)", f"{copied / seconds:,.0f} rows/s", f"{seconds:.1f}s"),
    ]
    for name, rate, took in table:
        print(f"  {name:<40}{rate:>18}{took:>10}")


async def main(events: int, profile: bool = False, workers: list[int | None] | None = None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = []
        nats_url = os.environ.get("NATS_URL")
        db_url = os.environ.get("DATABASE_URL")
        try:
            if not nats_url:
                server = EmbeddedNats.start(root / "nats", sync_always=False)
                started.append(server)
                nats_url = server.url
            if not db_url:
                pg = EmbeddedPostgres.start(root / "pg")
                started.append(pg)
                db_url = pg.url
            name = f"bench_replay_{uuid.uuid4().hex[:8]}"
            admin = await asyncpg.connect(Settings(DATABASE_URL=db_url).asyncpg_dsn)
            await admin.execute(f'create database "{name}"')
            await admin.close()
            base, _, query = db_url.partition("?")
            url = base.rsplit("/", 1)[0] + "/" + name + (f"?{query}" if query else "")
            try:
                await asyncio.to_thread(upgrade, Settings(DATABASE_URL=url))
                await run(nats_url, url, events, profile, workers or [None])
            finally:
                admin = await asyncpg.connect(Settings(DATABASE_URL=db_url).asyncpg_dsn)
                await admin.execute(f'drop database if exists "{name}" with (force)')
                await admin.close()
        finally:
            for server in reversed(started):
                server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--profile", action="store_true", help="cProfile the replay (its own CPU)")
    parser.add_argument(
        "--workers",
        help="processes folding the log, e.g. 2 or 2,1 (one replay each, same stream); default: replay's",
    )
    args = parser.parse_args()
    workers = [int(n) for n in args.workers.split(",")] if args.workers else None
    asyncio.run(main(args.events, args.profile, workers))
