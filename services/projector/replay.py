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
import contextlib
import gc
import json
import logging
import multiprocessing
import os
import re
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from nats.aio.msg import Msg
from nats.js import api
from sqlalchemy.sql import sqltypes

from schemas.events import UnknownEvent, decode_event, subject_token
from services.common.bus import REDRIVE_OF, Bus, is_redrive
from services.common.db import Base
from services.common.settings import Settings
from services.projector.logreader import LogReader, header_names
from services.projector.readmodels import READ_MODELS, ReadModel, Rebuild, Row

log = logging.getLogger(__name__)

SHADOW = "_rebuild"
LOCK_KEY = 0x666C7578  # "flux": one replay at a time
COPY_CHUNK = 50_000
CATCH_UP_ROUNDS = 3
STALL = 10.0  # seconds without a message before the replay gives up
REDRIVE = REDRIVE_OF.encode()
PARALLEL_FROM = 100_000  # messages: below this, starting worker processes costs more than it saves
MAX_WORKERS = 4  # every process reads the whole log: more only shares out decoding and folding

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


class Folding:
    """The read models being rebuilt, and how far the stream has been folded into them."""

    def __init__(self, models: Sequence[ReadModel]) -> None:
        self.models = list(models)
        self.rebuilds: list[tuple[ReadModel, Rebuild]] = [(m, m.rebuild()) for m in self.models]
        self.through = 0
        self.events = 0
        self.skipped = 0
        self.owns: Callable[[bytes], bool] | None = None  # this process's partition of subjects

    def fold(self, seq: int, data: bytes) -> None:
        try:
            event = decode_event(data)
        except UnknownEvent:
            self.skipped += 1  # the live projector parks it: it changes no read model
        else:
            for _, rebuild in self.rebuilds:
                rebuild.fold(seq, event)
            self.events += 1
        self.through = seq

    def tables(self) -> list[tuple[str, tuple[str, ...], Rebuild]]:
        return [
            (table, keys, rebuild) for model, rebuild in self.rebuilds for table, keys in model.keys.items()
        ]


async def read_stream(
    bus: Bus,
    folding: Folding,
    until_seq: int,
    say: Say | None = None,
    every: float = 1.0,
    reader: LogReader | None = None,
) -> None:
    """Fold every event after ``folding.through`` up to ``until_seq`` (inclusive): through
    ``reader`` (the raw protocol, see ``logreader.py``) when there is one, else through a
    nats-py ordered consumer. Dead letters and re-driven copies are passed over, never folded."""
    if until_seq <= folding.through:
        return
    if reader is None:
        await _read_ordered(bus, folding, until_seq, say, every)
        return
    dlq = f"{bus.prefix}.dlq.".encode()
    first, start = folding.through, time.monotonic()
    next_say = start + every
    owns = folding.owns
    async with contextlib.aclosing(reader.read(folding.through, until_seq, stall=STALL)) as chunks:
        async for chunk in chunks:  # a failed fold still closes the read (its consumer)
            for seq, subject, headers, data in chunk:
                if (
                    subject.startswith(dlq)
                    or (REDRIVE in headers and REDRIVE in header_names(headers))
                    or (owns is not None and not owns(subject))
                ):
                    folding.through = seq
                else:
                    folding.fold(seq, data)
            if say is not None and (now := time.monotonic()) >= next_say:
                next_say = now + every
                say(_progress(folding, first, until_seq, now - start))
    # The reader stops early only when nothing exists between its last delivery and until_seq.
    folding.through = max(folding.through, until_seq)


def _progress(folding: Folding, first: int, until_seq: int, seconds: float) -> str:
    return (
        f"read {folding.through:,}/{until_seq:,} "
        f"({(folding.through - first) / seconds:,.0f} messages/s, {folding.events:,} events folded)"
    )


async def _read_ordered(bus: Bus, folding: Folding, until_seq: int, say: Say | None, every: float) -> None:
    """``read_stream`` through nats-py (a TLS server): messages are folded in the
    subscription's callback; a stream that delivers nothing for ``STALL`` seconds fails."""
    finished = asyncio.Event()
    failure: list[BaseException] = []
    prefix_dlq = f"{bus.prefix}.dlq."

    async def on_msg(msg: Msg) -> None:
        if finished.is_set():
            return
        try:
            seq = msg.metadata.sequence.stream
            if seq > folding.through:
                if msg.subject.startswith(prefix_dlq) or is_redrive(msg.headers):
                    folding.through = seq
                else:
                    folding.fold(seq, msg.data)
        except Exception as exc:
            failure.append(exc)
            finished.set()
            return
        if folding.through >= until_seq:
            finished.set()

    sub = await bus.js.subscribe(
        bus.events_subject(),
        stream=bus.stream,
        cb=on_msg,
        ordered_consumer=True,
        pending_msgs_limit=200_000,
        pending_bytes_limit=512 * 1024 * 1024,
        config=api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=folding.through + 1
        ),
    )
    start = time.monotonic()
    first = seen = folding.through
    stalled_since = start
    try:
        while not finished.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(finished.wait(), every)
            now = time.monotonic()
            if folding.through != seen:
                seen, stalled_since = folding.through, now
            elif now - stalled_since > STALL:
                raise RuntimeError(f"the stream stopped delivering at seq {folding.through} of {until_seq}")
            if say is not None and not finished.is_set():
                say(_progress(folding, first, until_seq, now - start))
        if failure:
            raise failure[0]
    finally:
        try:
            await sub.unsubscribe()
        except Exception:
            log.debug("unsubscribing the replay's consumer failed", exc_info=True)


def partition(prefix: str, part: int, parts: int) -> Callable[[bytes], bool]:
    """Whether a subject is in partition ``part`` of ``parts``: by a stable hash of its task
    token (``<prefix>.task.<task>.<event>``, ``<prefix>.history.<source>.<token>.<event>``,
    the task id spelled as ``subject_token`` spells it); every other subject is in part 0."""
    task, history = f"{prefix}.task.".encode(), f"{prefix}.history.".encode()

    def owns(subject: bytes) -> bool:
        if subject.startswith(task):
            token = subject_token(subject[len(task) : subject.rindex(b".")].decode()).encode()
        elif subject.startswith(history):
            token = subject[len(history) :].split(b".")[1]
        else:
            return part == 0
        return zlib.crc32(token) % parts == part

    return owns


def _fold_partition(
    settings: Settings, names: list[str], part: int, parts: int, until_seq: int
) -> tuple[list[Rebuild], int, int]:
    """In a worker process: fold partition ``part`` of the log through ``until_seq``; its
    rebuilds (pickled back to the replay), events folded and skipped."""
    return asyncio.run(_fold_partition_async(settings, names, part, parts, until_seq))


async def _fold_partition_async(
    settings: Settings, names: list[str], part: int, parts: int, until_seq: int
) -> tuple[list[Rebuild], int, int]:
    bus = await Bus.connect(settings, f"replay-{part}", ensure=False, reconnect=False)
    try:
        reader = await LogReader.open(bus, settings)
        if reader is None:
            raise RuntimeError("a replay worker needs the raw reader")
        folding = Folding([READ_MODELS[n] for n in names])
        folding.owns = partition(bus.prefix, part, parts)
        try:
            with _no_gc():
                await read_stream(bus, folding, until_seq, reader=reader)
        finally:
            await reader.close()
        return [rebuild for _, rebuild in folding.rebuilds], folding.events, folding.skipped
    finally:
        await bus.close()


async def read_partitioned(
    settings: Settings,
    bus: Bus,
    folding: Folding,
    until_seq: int,
    reader: LogReader,
    workers: int,
    say: Say | None = None,
) -> None:
    """``read_stream`` in ``workers`` partitions (``partition``): this process folds part 0
    while worker processes fold the others, then their rebuilds are merged into ``folding``.
    Every process reads the whole log (cheap); each decodes and folds only its part."""
    names = [model.name for model in folding.models]
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(workers - 1, mp_context=multiprocessing.get_context("spawn")) as pool:
        others = [
            loop.run_in_executor(pool, _fold_partition, settings, names, part, workers, until_seq)
            for part in range(1, workers)
        ]
        folding.owns = partition(bus.prefix, 0, workers)
        with _no_gc():  # also while the workers' rebuilds are unpickled: twice as fast
            try:
                await read_stream(bus, folding, until_seq, say, reader=reader)
            finally:
                folding.owns = None
            for rebuilds, events, skipped in await asyncio.gather(*others):
                for (_, mine), theirs in zip(folding.rebuilds, rebuilds, strict=True):
                    mine.merge(theirs)
                folding.events += events
                folding.skipped += skipped


def _idle_cpus() -> int:
    """1 plus the CPUs the load average leaves idle, at most ``MAX_WORKERS``. More processes
    than idle CPUs only add the cost of sharing out (every process reads the whole log,
    the rebuilds are pickled back): measured on a busy machine, 60 % more CPU and no gain."""
    idle = (os.cpu_count() or 1) - os.getloadavg()[0]
    return max(1, min(MAX_WORKERS, 1 + int(idle)))


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """No cyclic garbage collection while folding or loading: the rows are long-lived and
    acyclic, and each collection would re-scan all of them."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


async def _columns(conn: asyncpg.Connection, table: str) -> list[tuple[str, str]]:
    rows = await conn.fetch(
        "select column_name, data_type from information_schema.columns "
        "where table_schema = current_schema() and table_name = $1 order by ordinal_position",
        table,
    )
    return [(r["column_name"], r["data_type"]) for r in rows]


def _sql_nulls(table: str) -> set[str]:
    """JSON columns whose Python None is SQL NULL. SQLAlchemy's JSON types store None as JSON
    ``null`` unless ``none_as_null``; the live projector writes through them, so we match it."""
    known = Base.metadata.tables.get(table)
    if known is None:
        return set()
    return {c.name for c in known.columns if isinstance(c.type, sqltypes.JSON) and c.type.none_as_null}


def _records(rows: Iterable[Row], table: str, columns: list[tuple[str, str]]) -> Iterable[tuple[Any, ...]]:
    jsons = {name for name, kind in columns if kind in ("json", "jsonb")}
    nulls = _sql_nulls(table)
    names = [name for name, _ in columns]
    for row in rows:
        yield tuple(
            (None if row[n] is None and n in nulls else json.dumps(row[n])) if n in jsons else row[n]
            for n in names
        )


async def _create_shadow(conn: asyncpg.Connection, table: str) -> None:
    shadow = _ident(table + SHADOW)
    await conn.execute(f"drop table if exists {shadow}")
    await conn.execute(
        f"create table {shadow} (like {_ident(table)} including defaults including constraints "
        "including generated including identity including storage)"
    )


async def _load(conn: asyncpg.Connection, table: str, rows: Iterable[Row]) -> int:
    """COPY ``rows`` into the shadow of ``table``; the row count."""
    live = await _columns(conn, table)
    everything = list(rows)
    if not everything:
        return 0
    columns = [(n, k) for n, k in live if n in everything[0]]
    count = 0
    chunk: list[tuple[Any, ...]] = []
    for record in _records(everything, table, columns):
        chunk.append(record)
        if len(chunk) >= COPY_CHUNK:
            await conn.copy_records_to_table(table + SHADOW, records=chunk, columns=[n for n, _ in columns])
            count += len(chunk)
            chunk = []
    if chunk:
        await conn.copy_records_to_table(table + SHADOW, records=chunk, columns=[n for n, _ in columns])
        count += len(chunk)
    return count


async def _fill_shadow(
    settings: Settings, table: str, sources: list[Rebuild]
) -> tuple[int, list[tuple[str, str, str]]]:
    """COPY every source's rows of ``table`` into its shadow, then index it (``_index_shadow``)."""
    conn = await asyncpg.connect(settings.asyncpg_dsn)
    try:
        count = 0
        for rebuild in sources:
            count += await _load(conn, table, rebuild.rows(table))
        return count, await _index_shadow(conn, table)
    finally:
        await conn.close()


INDEX_DEF = re.compile(r"^CREATE (UNIQUE )?INDEX (\S+) ON (\S+) (USING .*)$")


def _temp_name(name: str) -> str:
    return name[: 63 - len(SHADOW)] + SHADOW


async def _index_shadow(conn: asyncpg.Connection, table: str) -> list[tuple[str, str, str]]:
    """Give the shadow the live table's primary key, unique constraints and indexes under
    temporary names; returns (kind, temporary name, live name) to rename after the swap."""
    renames: list[tuple[str, str, str]] = []
    shadow = _ident(table + SHADOW)
    constraints = await conn.fetch(
        "select c.conname, pg_get_constraintdef(c.oid) as def, c.conindid from pg_constraint c "
        "where c.conrelid = $1::regclass and c.contype in ('p', 'u') order by c.contype, c.conname",
        table,
    )
    backing = {r["conindid"] for r in constraints}
    for r in constraints:
        temp = _temp_name(r["conname"])
        await conn.execute(f"alter table {shadow} add constraint {_ident(temp)} {r['def']}")
        renames.append(("constraint", temp, r["conname"]))
    indexes = await conn.fetch(
        "select i.indexrelid, c.relname, pg_get_indexdef(i.indexrelid) as def from pg_index i "
        "join pg_class c on c.oid = i.indexrelid where i.indrelid = $1::regclass order by c.relname",
        table,
    )
    for r in indexes:
        if r["indexrelid"] in backing:
            continue
        match = INDEX_DEF.match(r["def"])
        if match is None:
            raise RuntimeError(f"cannot copy index {r['relname']}: {r['def']}")
        temp = _temp_name(r["relname"])
        await conn.execute(f"create {match[1] or ''}index {_ident(temp)} on {shadow} {match[4]}")
        renames.append(("index", temp, r["relname"]))
    return renames


async def _upsert(conn: asyncpg.Connection, table: str, keys: tuple[str, ...], rows: list[Row]) -> None:
    if not rows:
        return
    live = await _columns(conn, table)
    columns = [(n, k) for n, k in live if n in rows[0]]
    names = [n for n, _ in columns]
    placeholders = ", ".join(
        f"${i}::{'jsonb' if k == 'jsonb' else 'json'}" if k in ("json", "jsonb") else f"${i}"
        for i, (_, k) in enumerate(columns, 1)
    )
    updates = ", ".join(f"{_ident(n)} = excluded.{_ident(n)}" for n in names if n not in keys)
    await conn.executemany(
        f"insert into {_ident(table + SHADOW)} ({', '.join(map(_ident, names))}) values ({placeholders}) "
        f"on conflict ({', '.join(map(_ident, keys))}) do "
        + (f"update set {updates}" if updates else "nothing"),
        list(_records(rows, table, columns)),
    )


async def _catch_up(conn: asyncpg.Connection, folding: Folding) -> None:
    for table, keys, rebuild in folding.tables():
        await _upsert(conn, table, keys, rebuild.changes(table))


async def _orphans(conn: asyncpg.Connection, table: str, keys: tuple[str, ...]) -> int:
    """Rows of the live ``table`` the rebuild has no row for (by ``keys``)."""
    match = " and ".join(f"s.{_ident(k)} = l.{_ident(k)}" for k in keys)
    return int(
        await conn.fetchval(
            f"select count(*) from {_ident(table)} l "
            f"where not exists (select 1 from {_ident(table + SHADOW)} s where {match})"
        )
    )


async def _swap(conn: asyncpg.Connection, table: str, renames: list[tuple[str, str, str]]) -> None:
    shadow = table + SHADOW
    for column, _ in await _columns(conn, table):
        sequence = await conn.fetchval("select pg_get_serial_sequence($1, $2)", table, column)
        if sequence is not None:
            await conn.execute(f"alter sequence {sequence} owned by {_ident(shadow)}.{_ident(column)}")
    await conn.execute(f"drop table {_ident(table)}")
    await conn.execute(f"alter table {_ident(shadow)} rename to {_ident(table)}")
    for kind, temp, name in renames:
        if kind == "constraint":
            await conn.execute(
                f"alter table {_ident(table)} rename constraint {_ident(temp)} to {_ident(name)}"
            )
        else:
            await conn.execute(f"alter index {_ident(temp)} rename to {_ident(name)}")


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


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
            workers = _idle_cpus() if target >= PARALLEL_FROM else 1
        if workers > 1 and reader is not None and all(m.by_task for m in models):
            tell(f"folding in {workers} processes")
            result.workers = workers
            await read_partitioned(settings, bus, folding, target, reader, workers, say)
        else:
            with _no_gc():
                await read_stream(bus, folding, target, say, reader=reader)
        result.read_seconds = time.monotonic() - started
        tell(f"read {folding.through:,} messages in {result.read_seconds:.1f}s; loading shadow tables")
        loading = time.monotonic()
        sources: dict[str, list[Rebuild]] = {}
        for table, _, rebuild in folding.tables():  # a table several read models fill gets
            sources.setdefault(table, []).append(rebuild)  # every one's rows
        tables = list(sources)
        for table in tables:
            await _create_shadow(conn, table)
        # Each table on its own connection: PostgreSQL writes one while we encode the next.
        with _no_gc():  # encoding the records allocates; collections would re-scan every row
            loaded = await asyncio.gather(*(_fill_shadow(settings, t, sources[t]) for t in tables))
        renames: dict[str, list[tuple[str, str, str]]] = {}
        for table, (count, renamed) in zip(tables, loaded, strict=True):
            result.rows[table], renames[table] = count, renamed
            tell(f"loaded {table}{SHADOW}: {count:,} rows")
        for _ in range(CATCH_UP_ROUNDS):
            latest = await _last_seq(bus)
            if latest <= folding.through:
                break
            await read_stream(bus, folding, latest, reader=reader)
            await _catch_up(conn, folding)
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
            await _catch_up(conn, folding)
            keys = {table: k for table, k, _ in folding.tables()}
            for table in tables:
                lost = await _orphans(conn, table, keys[table])
                if lost and not force:
                    raise RuntimeError(
                        f"{lost:,} row(s) of {table} have no counterpart in the rebuild (filled by a read "
                        "model that is not registered for replay?); nothing was swapped. Register it, or "
                        "pass --force to drop them"
                    )
            for table in tables:
                await _swap(conn, table, renames[table])
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
