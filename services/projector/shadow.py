"""The shadow tables of ``fluxpipe replay`` (``replay.py``): COPY the folded rows in, build the
live table's indexes and constraints on them, upsert what arrived meanwhile, and swap them in.

Invariants:
- A shadow table is created ``LIKE`` its live table, so its columns are the migrations'.
- Indexes and constraints get the live names at the swap, so the schema after it is exactly
  what the migrations made (``alembic check`` stays clean).
- The swap drops nothing it has not replaced: rows only the live table holds are counted
  (``orphans``) before it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

import asyncpg
from sqlalchemy.sql import sqltypes

from services.common.db import Base
from services.common.settings import Settings
from services.projector.readmodels import Rebuild, Row
from services.projector.replay_read import Folding

SHADOW = "_rebuild"
COPY_CHUNK = 50_000


async def table_columns(conn: asyncpg.Connection, table: str) -> list[tuple[str, str]]:
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


async def create_shadow(conn: asyncpg.Connection, table: str) -> None:
    shadow = _ident(table + SHADOW)
    await conn.execute(f"drop table if exists {shadow}")
    await conn.execute(
        f"create table {shadow} (like {_ident(table)} including defaults including constraints "
        "including generated including identity including storage)"
    )


async def _load(conn: asyncpg.Connection, table: str, rows: Iterable[Row]) -> int:
    """COPY ``rows`` into the shadow of ``table``; the row count."""
    live = await table_columns(conn, table)
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


async def fill_shadow(
    settings: Settings, table: str, sources: list[Rebuild]
) -> tuple[int, list[tuple[str, str, str]]]:
    """COPY every source's rows of ``table`` into its shadow, then index it (``index_shadow``)."""
    conn = await asyncpg.connect(settings.asyncpg_dsn)
    try:
        count = 0
        for rebuild in sources:
            count += await _load(conn, table, rebuild.rows(table))
        return count, await index_shadow(conn, table)
    finally:
        await conn.close()


INDEX_DEF = re.compile(r"^CREATE (UNIQUE )?INDEX (\S+) ON (\S+) (USING .*)$")


def _temp_name(name: str) -> str:
    return name[: 63 - len(SHADOW)] + SHADOW


async def index_shadow(conn: asyncpg.Connection, table: str) -> list[tuple[str, str, str]]:
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
    live = await table_columns(conn, table)
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


async def catch_up(conn: asyncpg.Connection, folding: Folding) -> None:
    for table, keys, rebuild in folding.tables():
        await _upsert(conn, table, keys, rebuild.changes(table))


async def orphans(conn: asyncpg.Connection, table: str, keys: tuple[str, ...]) -> int:
    """Rows of the live ``table`` the rebuild has no row for (by ``keys``)."""
    match = " and ".join(f"s.{_ident(k)} = l.{_ident(k)}" for k in keys)
    return int(
        await conn.fetchval(
            f"select count(*) from {_ident(table)} l "
            f"where not exists (select 1 from {_ident(table + SHADOW)} s where {match})"
        )
    )


async def swap(conn: asyncpg.Connection, table: str, renames: list[tuple[str, str, str]]) -> None:
    shadow = table + SHADOW
    for column, _ in await table_columns(conn, table):
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
