"""The unified history at a million rows: a page read by keyset (ours) beside OFFSET paging
(the plan's ``page``), measured in the same run on the same table (run: ``python
bench/bench_history.py``; ``DATABASE_URL`` to use an existing server, else an embedded one).

The table holds 1,000,000 items: one heavy user with 200,000 of them, the rest spread over
2,000 users, across the three sources. Every query is the route's own (``page_query``), run
through the same engine; each figure is the median of ``--repeat`` runs. Prints figures and
each query's plan root only; nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import Select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from schemas.history import decode_cursor, encode_cursor
from services.common.db import make_engine
from services.common.embedded import EmbeddedPostgres
from services.common.migrate import upgrade
from services.common.settings import Settings
from services.gateway.routes.history import page_query

ROWS = 1_000_000
HEAVY = 200_000
LIMIT = 20

FILL = f"""
INSERT INTO image_history (source, source_task_id, user_id, model, tag, prompt, image_url, created_at, status)
SELECT (ARRAY['flux','midjourney','jimeng'])[1 + i % 3], 'i' || i,
       CASE WHEN i % 5 = 0 THEN 'heavy' ELSE 'user' || (i % 2000) END,
       (ARRAY['fal-ai/flux-1/dev','fal-ai/flux-1/schnell', NULL])[1 + i % 3], 'tag',
       'a picture number ' || i, 'https://cdn.example/' || i || '.jpg',
       timestamptz '2024-01-01' + i * interval '30 seconds', 'SUCCESS'
FROM generate_series(1, {ROWS}) AS i
"""


async def timed(engine: AsyncEngine, query: Select[Any], repeat: int) -> tuple[float, list[Any]]:
    """Median milliseconds of ``query`` over ``repeat`` runs, and its rows."""
    times, rows = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        async with engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), rows


async def plan_root(engine: AsyncEngine, query: Select[Any]) -> str:
    compiled = query.compile(dialect=engine.dialect)
    args = [compiled.params[name] for name in compiled.positiontup or ()]
    async with engine.connect() as conn:
        driver = (await conn.get_raw_connection()).driver_connection
        assert driver is not None
        plan = [r[0] for r in await driver.fetch("EXPLAIN " + str(compiled), *args)]
    scans = [line.strip().lstrip("-> ") for line in plan if "Scan" in line]
    return scans[0].split("  (")[0] if scans else plan[0]


async def cursor_at(engine: AsyncEngine, depth: int, **filters: Any) -> tuple[datetime, int]:
    """The keyset position after ``depth`` items (what a client's cursor holds there)."""
    async with engine.connect() as conn:
        row = (await conn.execute(page_query("heavy", limit=1, offset=depth - 1, **filters))).one()
    return decode_cursor(encode_cursor(row.created_at, row.id))


async def bench(database_url: str, repeat: int) -> None:
    engine = make_engine(Settings(DATABASE_URL=database_url))
    start = time.perf_counter()
    async with engine.begin() as conn:
        await conn.execute(text(FILL))
        await conn.execute(text("ANALYZE image_history"))
    print(f"loaded {ROWS:,} items in {time.perf_counter() - start:.1f} s (user 'heavy' has {HEAVY:,})")
    print(f"page of {LIMIT}, median of {repeat} runs")
    cases: list[tuple[str, Select[Any], Select[Any] | None]] = [
        ("first page", page_query("heavy", limit=LIMIT), None),
        ("first page, source=jimeng", page_query("heavy", source="jimeng", limit=LIMIT), None),
        ("first page, model filter", page_query("heavy", model="fal-ai/flux-1/dev", limit=LIMIT), None),
        (
            "first page, one day",
            page_query(
                "heavy",
                since=datetime(2024, 3, 1, tzinfo=UTC),
                until=datetime(2024, 3, 2, tzinfo=UTC),
                limit=LIMIT,
            ),
            None,
        ),
        ("first page, prompt text", page_query("heavy", q="number 99", limit=LIMIT), None),
        ("first page, rare prompt text", page_query("heavy", q="number 4242420", limit=LIMIT), None),
    ]
    for depth in (1_000, 10_000, 100_000):
        after = await cursor_at(engine, depth)
        cases.append(
            (
                f"page at item {depth:,}",
                page_query("heavy", after=after, limit=LIMIT),
                page_query("heavy", offset=depth, limit=LIMIT),
            )
        )
    after = await cursor_at(engine, 50_000, source="jimeng")
    cases.append(
        (
            "page at item 50,000, source=jimeng",
            page_query("heavy", source="jimeng", after=after, limit=LIMIT),
            page_query("heavy", source="jimeng", offset=50_000, limit=LIMIT),
        )
    )
    for name, ours, baseline in cases:
        ms, rows = await timed(engine, ours, repeat)
        line = f"  {name:<36} keyset {ms:8.2f} ms  [{await plan_root(engine, ours)}]"
        if baseline is not None:
            base_ms, base_rows = await timed(engine, baseline, repeat)
            assert [r.id for r in rows] == [r.id for r in base_rows], "keyset and OFFSET disagree"
            line += f"   OFFSET {base_ms:8.2f} ms (baseline)"
        print(line)
    await engine.dispose()


def with_database(url: str, name: str) -> str:
    base, _, query = url.partition("?")
    base = base.rsplit("/", 1)[0] + "/" + name
    return f"{base}?{query}" if query else base


async def admin(server_url: str, statement: str) -> None:
    conn = await asyncpg.connect(Settings(DATABASE_URL=server_url).asyncpg_dsn)
    await conn.execute(statement)
    await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=21)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = None
        server_url = os.environ.get("DATABASE_URL")
        if server_url is None:
            server = EmbeddedPostgres.start(Path(tmp) / "pg")
            server_url = server.url
        name = f"fluxpipe_bench_{uuid.uuid4().hex[:8]}"
        asyncio.run(admin(server_url, f'CREATE DATABASE "{name}"'))
        database_url = with_database(server_url, name)
        try:
            upgrade(Settings(DATABASE_URL=database_url))
            asyncio.run(bench(database_url, args.repeat))
        finally:
            asyncio.run(admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            if server is not None:
                server.stop()


if __name__ == "__main__":
    main()
