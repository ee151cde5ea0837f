"""``fluxpipe replay``: rebuild read models from the start of the stream and swap them in.

How it goes, and why queries keep working throughout:

1. Read every event from stream sequence 1 to the stream's last sequence ``S`` (the raw
   protocol reader of ``logreader.py``, or nats-py's ordered consumer on a TLS server; the
   same subjects the live projector follows, dead letters and re-driven copies skipped) and fold
   them in memory with the read models' registered folds (``readmodels.py``).
   A large log is folded in parallel processes when CPUs are idle, each taking the tasks
   of one partition of the subjects (``read_partitioned``; read models declare they allow
   it with ``by_task``).
2. Bulk-load the rows with COPY into shadow tables ``<table>_rebuild`` (created ``LIKE`` the
   live table, without indexes; each table over its own connection, concurrently), then
   build the live table's indexes and constraints on them (faster after the load than
   during it).
3. Catch up: events that arrived meanwhile are folded too and the changed rows upserted.
4. Swap, in one transaction: lock the read models' checkpoint rows (the live projector
   locks the same row first in every batch, so it waits here, never in the middle of a
   batch); fold and upsert whatever the live projector applied beyond what we read; drop the
   live table, rename the shadow and its indexes and constraints to the live names (so the
   schema is exactly what the migrations made; ``alembic check`` stays clean), hand over
   owned sequences, and set the checkpoints to the last sequence folded. Readers wait for
   the few milliseconds this takes, then read the new tables.

The live projector never has to be stopped: after the swap it skips every event at or
below the checkpoint, exactly as after a restart. One replay at a time (an advisory lock).

Limits: an event the live projector parked because PostgreSQL rejected its data makes the
COPY fail too; the replay then stops with the database's reason and changes nothing live.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import asyncpg

from services.common.bus import Bus
from services.common.settings import Settings
from services.projector.logreader import LogReader
from services.projector.readmodels import READ_MODELS, Rebuild
from services.projector.replay_read import Folding, idle_cpus, no_gc, read_partitioned, read_stream
from services.projector.shadow import catch_up, create_shadow, fill_shadow, orphans, swap

SHADOW = "_rebuild"
LOCK_KEY = 0x666C7578  # "flux": one replay at a time
CATCH_UP_ROUNDS = 3
PARALLEL_FROM = 100_000  # messages: below this, starting worker processes costs more than it saves

Say = Callable[[str], None]


@dataclass
class ReplayResult:
    models: list[str]
    events: int = 0
    skipped: int = 0
    through_seq: int = 0
    workers: int = 1
    rows: dict[str, int] = field(default_factory=dict)
    read_seconds: float = 0.0
    load_seconds: float = 0.0
    swap_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


async def _last_seq(bus: Bus) -> int:
    info = await bus.js.stream_info(bus.stream)
    return int(info.state.last_seq)


async def replay(
    settings: Settings,
    bus: Bus,
    names: Sequence[str] | None = None,
    say: Say | None = None,
    *,
    force: bool = False,
    workers: int | None = None,
) -> ReplayResult:
    """Rebuild the read models ``names`` (default: every registered one) and swap them in.

    Refuses the swap (and changes nothing live) if a live table holds rows the rebuild has
    no row for, e.g. another source's history whose read model is not registered, unless
    ``force``: those rows would be lost.

    ``workers`` processes fold the log in parallel (``read_partitioned``) when every read
    model is ``by_task`` and the raw reader is available; default: one per idle CPU (at
    most ``MAX_WORKERS``) for a log of ``PARALLEL_FROM`` messages or more, else one."""
    unknown = [n for n in names or () if n not in READ_MODELS]
    if unknown:
        raise ValueError(f"unknown read model(s) {', '.join(unknown)}; known: {', '.join(READ_MODELS)}")
    models = [READ_MODELS[n] for n in (names or READ_MODELS)]
    tell: Say = say or (lambda line: None)
    result = ReplayResult(models=[m.name for m in models])
    started = time.monotonic()
    folding = Folding(models)
    conn = await asyncpg.connect(settings.asyncpg_dsn)
    reader: LogReader | None = None
    try:
        if not await conn.fetchval("select pg_try_advisory_lock($1)", LOCK_KEY):
            raise RuntimeError("another replay is running on this database")
        target = await _last_seq(bus)
        tell(f"replaying {', '.join(result.models)} from stream {bus.stream} seq 1 to {target:,}")
        reader = await LogReader.open(bus, settings)
        if workers is None:
            workers = idle_cpus() if target >= PARALLEL_FROM else 1
        if workers > 1 and reader is not None and all(m.by_task for m in models):
            tell(f"folding in {workers} processes")
            result.workers = workers
            await read_partitioned(settings, bus, folding, target, reader, workers, say)
        else:
            with no_gc():
                await read_stream(bus, folding, target, say, reader=reader)
        result.read_seconds = time.monotonic() - started
        tell(f"read {folding.through:,} messages in {result.read_seconds:.1f}s; loading shadow tables")
        loading = time.monotonic()
        sources: dict[str, list[Rebuild]] = {}
        for table, _, rebuild in folding.tables():  # a table several read models fill gets
            sources.setdefault(table, []).append(rebuild)  # every one's rows
        tables = list(sources)
        for table in tables:
            await create_shadow(conn, table)
        # Each table on its own connection: PostgreSQL writes one while we encode the next.
        with no_gc():  # encoding the records allocates; collections would re-scan every row
            loaded = await asyncio.gather(*(fill_shadow(settings, t, sources[t]) for t in tables))
        renames: dict[str, list[tuple[str, str, str]]] = {}
        for table, (count, renamed) in zip(tables, loaded, strict=True):
            result.rows[table], renames[table] = count, renamed
            tell(f"loaded {table}{SHADOW}: {count:,} rows")
        for _ in range(CATCH_UP_ROUNDS):
            latest = await _last_seq(bus)
            if latest <= folding.through:
                break
            await read_stream(bus, folding, latest, reader=reader)
            await catch_up(conn, folding)
        result.load_seconds = time.monotonic() - loading
        swapping = time.monotonic()
        async with conn.transaction():
            checkpoints = [m.checkpoint for m in models]
            await conn.executemany(
                "insert into projector_checkpoints (name, stream_seq) values ($1, 0) on conflict do nothing",
                [(c,) for c in checkpoints],
            )
            applied = await conn.fetchval(
                "select coalesce(max(stream_seq), 0) from (select stream_seq from projector_checkpoints "
                "where name = any($1::text[]) order by name for update) c",
                checkpoints,
            )
            if applied > folding.through:
                await read_stream(bus, folding, applied, reader=reader)
            await catch_up(conn, folding)
            keys = {table: k for table, k, _ in folding.tables()}
            for table in tables:
                lost = await orphans(conn, table, keys[table])
                if lost and not force:
                    raise RuntimeError(
                        f"{lost:,} row(s) of {table} have no counterpart in the rebuild (filled by a read "
                        "model that is not registered for replay?); nothing was swapped. Register it, or "
                        "pass --force to drop them"
                    )
            for table in tables:
                await swap(conn, table, renames[table])
            await conn.execute(
                "update projector_checkpoints set stream_seq = $2, updated_at = now() "
                "where name = any($1::text[])",
                checkpoints,
                folding.through,
            )
        result.swap_seconds = time.monotonic() - swapping
    finally:
        if reader is not None:
            await reader.close()
        await conn.close()
    result.events, result.skipped, result.through_seq = folding.events, folding.skipped, folding.through
    result.seconds = time.monotonic() - started
    tell(
        f"swapped in {', '.join(result.models)} through seq {result.through_seq:,}: "
        f"{result.events:,} events in {result.seconds:.1f}s ({result.events_per_second:,.0f} events/s; "
        f"swap {result.swap_seconds * 1000:.0f} ms)"
    )
    return result
