"""``fluxpipe replay`` rebuilds the read models from the log and swaps them in while queries
keep working; the result equals what the live projector builds, row by row."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from alembic import command
from sqlalchemy.ext.asyncio import AsyncEngine

from schemas.events import (
    FluxEvent,
    HistoryItemHidden,
    HistoryItemHiddenData,
    HistoryItemRecorded,
    HistoryItemRecordedData,
    ImagesStored,
    ImagesStoredData,
    ProviderImage,
    StorageFailed,
    StorageFailedData,
    StoredImage,
    TaskCompleted,
    TaskCompletedData,
    TaskFailed,
    TaskFailedData,
    TaskRequested,
    TaskRequestedData,
    TaskStatusChanged,
    TaskStatusChangedData,
    TaskSubmitted,
    TaskSubmittedData,
    encode_event,
)
from services.common.bus import REDRIVE_OF, Bus
from services.common.db import make_engine
from services.common.migrate import alembic_config
from services.common.settings import Settings
from services.projector import logreader
from services.projector.main import project
from services.projector.replay import replay
from tests.conftest import migrated_database
from tests.test_bus import wait_for


def task_story(
    task_id: str,
    outcome: str,
    user: str = "alice",
    model: str = "fal-ai/flux-1/dev",
    generation_time: float | None = None,
) -> list[FluxEvent]:
    """A task's events for one of the outcomes ``stored``, ``storage_failed``, ``failed``,
    ``timeout``, ``running``."""
    ids = {"task_id": task_id, "user_id": user}
    events: list[FluxEvent] = [
        TaskRequested(
            **ids,
            data=TaskRequestedData(
                model=model, task_type="text_to_image", prompt=f"prompt {task_id}", seed=3
            ),
        )
    ]
    if outcome == "failed_submit":
        return events + [
            TaskFailed(**ids, data=TaskFailedData(stage="submit", error="422 bad", status_code=422))
        ]
    events.append(
        TaskSubmitted(
            **ids,
            data=TaskSubmittedData(
                request_id=f"req-{task_id}",
                status_url="s",
                response_url="r",
                cancel_url="c",
                queue_position=2,
            ),
        )
    )
    events.append(TaskStatusChanged(**ids, data=TaskStatusChangedData(status="IN_PROGRESS", seq=1)))
    if outcome == "running":
        return events
    if outcome in ("failed", "timeout"):
        stage = "result" if outcome == "failed" else "timeout"
        return events + [TaskFailed(**ids, data=TaskFailedData(stage=stage, error=f"{outcome} at fal"))]
    events.append(
        TaskCompleted(
            **ids,
            data=TaskCompletedData(
                request_id=f"req-{task_id}",
                images=(ProviderImage(url=f"https://fal/{task_id}.jpg", width=64, height=64),),
                generation_time=generation_time if generation_time is not None else 1.0 + len(task_id) % 5,
            ),
        )
    )
    if outcome == "storage_failed":
        return events + [StorageFailed(**ids, data=StorageFailedData(error="disk full"))]
    stored = StoredImage(
        url=f"http://gw/files/{task_id}.jpg",
        key=f"{task_id}.jpg",
        content_type="image/jpeg",
        width=64,
        height=64,
        size=1000,
    )
    return events + [ImagesStored(**ids, data=ImagesStoredData(images=(stored,)))]


HIDE_FLUX = HistoryItemHiddenData(source="flux")


async def _none() -> None:
    return None


async def publish_again(bus: Bus, event: FluxEvent, tag: str) -> None:
    """The same event once more under another msg id, as a redelivery past the duplicate
    window or a re-drive would put it in the log."""
    await bus.js.publish(
        event.subject(bus.prefix), encode_event(event), stream=bus.stream, headers={"Nats-Msg-Id": tag}
    )


async def publish_mixed_run(bus: Bus, prefix: str, n: int = 12) -> None:
    outcomes = ("stored", "storage_failed", "failed", "timeout", "running", "failed_submit")
    for i in range(n):
        story = task_story(f"{prefix}{i}", outcomes[i % len(outcomes)], user=f"user{i % 3}")
        for event in story:
            await bus.publish(event)
        await publish_again(bus, story[-1], f"again-{prefix}{i}")
        # A late status after the end never regresses the task.
        await bus.publish(
            TaskStatusChanged(
                task_id=f"{prefix}{i}",
                user_id=f"user{i % 3}",
                data=TaskStatusChangedData(status="IN_QUEUE", seq=9),
            )
        )
    # The unified history: another generator's item, a flux item hidden by its owner, and one
    # a stranger tries to hide (changes nothing).
    await bus.publish(
        HistoryItemRecorded(
            task_id=f"{prefix}:mj",  # not a subject token: its subjects carry a digest
            user_id="user1",
            data=HistoryItemRecordedData(
                source="midjourney",
                status="SUCCESS",
                prompt="a cat",
                image_url=f"https://mj/{prefix}.png",
                created_at=datetime(2026, 1, 1, tzinfo=UTC),
            ),
        )
    )
    await bus.publish(HistoryItemHidden(task_id=f"{prefix}0", user_id="user0", data=HIDE_FLUX))
    await bus.publish(HistoryItemHidden(task_id=f"{prefix}6", user_id="user1", data=HIDE_FLUX))
    # A re-driven copy (fluxpipe dlq redrive) is for its consumer only: no reader folds it.
    running = TaskStatusChanged(
        task_id=f"{prefix}4", user_id="user1", data=TaskStatusChangedData(status="IN_PROGRESS", seq=1)
    )
    await bus.js.publish(
        running.subject(bus.prefix),
        encode_event(running),
        stream=bus.stream,
        headers={"Nats-Msg-Id": f"copy-{prefix}", REDRIVE_OF: "1", "Fluxpipe-Stream-Seq": "1"},
    )
    await bus.js.publish(f"{bus.prefix}.task.x.requested", b'{"type": "task.unknown"}', stream=bus.stream)
    await bus.dead_letter("poller", f"{bus.prefix}.task.{prefix}0.submitted", 1, b"{}", "test letter")


async def applied(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        from sqlalchemy import text

        return int(
            (
                await conn.execute(text("select coalesce(max(stream_seq), 0) from projector_checkpoints"))
            ).scalar_one()
        )


async def caught_up(bus: Bus, engine: AsyncEngine) -> None:
    async def done() -> bool:
        info = await bus.js.stream_info(bus.stream)
        return await applied(engine) >= info.state.last_seq

    await wait_for(done, timeout=30)


async def snapshot(dsn: str) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        tasks = [dict(r) for r in await conn.fetch("select * from flux_tasks order by id")]
        history = [
            {k: v for k, v in dict(r).items() if k != "id"}
            for r in await conn.fetch("select * from image_history order by source, source_task_id")
        ]
        schema = sorted(
            (r["tablename"], r["indexname"], r["indexdef"])
            for r in await conn.fetch(
                "select tablename, indexname, indexdef from pg_indexes"
                " where tablename in ('flux_tasks', 'image_history')"
            )
        )
        constraints = sorted(
            r["conname"]
            for r in await conn.fetch(
                "select conname from pg_constraint"
                " where conrelid in ('flux_tasks'::regclass, 'image_history'::regclass)"
            )
        )
    finally:
        await conn.close()
    return {"tasks": tasks, "history": history, "schema": schema, "constraints": constraints}


def differences(rows: list[dict[str, Any]], expected: list[dict[str, Any]]) -> list[str]:
    """Every (row, column) where two tables differ, readably."""
    found = [f"{len(rows)} rows, expected {len(expected)}"] if len(rows) != len(expected) else []
    for got, want in zip(rows, expected, strict=False):
        found += [
            f"{want.get('id', want.get('source_task_id'))}.{k}: {got.get(k)!r} != {v!r}"
            for k, v in want.items()
            if got.get(k) != v
        ]
    return found


@pytest.fixture
async def second_database(pg_server_url: str) -> AsyncIterator[str]:
    """Another freshly migrated database, for a projection built from scratch."""
    async with migrated_database(pg_server_url, "fluxpipe_replay") as url:
        yield url


async def test_replay_swaps_in_tables_equal_to_the_live_projection_while_queries_keep_working(
    bus, engine, settings, second_database
):
    await publish_mixed_run(bus, "a")
    stop = asyncio.Event()
    live = asyncio.create_task(project(bus, engine, stop))
    await caught_up(bus, engine)
    # The live projector restarts mid-run: it resumes from its checkpoint (redelivery).
    stop.set()
    await live
    await publish_mixed_run(bus, "b")
    stop = asyncio.Event()
    live = asyncio.create_task(project(bus, engine, stop))
    await caught_up(bus, engine)
    before = await snapshot(settings.asyncpg_dsn)
    assert {t["status"] for t in before["tasks"]} == {"SUCCESS", "FAILED", "IN_QUEUE"}

    queries, failures = 0, []
    reading = asyncio.Event()

    async def read_while_replaying() -> None:
        nonlocal queries
        conn = await asyncpg.connect(settings.asyncpg_dsn)
        try:
            while not reading.is_set():
                try:
                    await conn.fetch("select id, status from flux_tasks where user_id = $1", "user1")
                    await conn.fetch("select * from image_history where user_id = $1", "user1")
                    queries += 1
                except Exception as exc:  # any failure is what this test must not see
                    failures.append(repr(exc))
                await asyncio.sleep(0.01)
        finally:
            await conn.close()

    reader = asyncio.create_task(read_while_replaying())
    lines: list[str] = []
    rebuilding = asyncio.create_task(replay(settings, bus, say=lines.append))
    await publish_mixed_run(bus, "c", n=6)  # arriving while the replay runs
    result = await rebuilding
    await caught_up(bus, engine)
    reading.set()
    await reader
    stop.set()
    await live

    assert failures == [] and queries > 0
    assert result.events > 0 and result.rows["flux_tasks"] >= 24
    assert any("swapped in flux_tasks" in line for line in lines)

    fresh = settings.model_copy(update={"database_url": second_database})
    scratch = make_engine(fresh)
    stop = asyncio.Event()
    rebuilt_live = asyncio.create_task(project(bus, scratch, stop))
    try:
        await caught_up(bus, scratch)
    finally:
        stop.set()
        await rebuilt_live
        await scratch.dispose()

    after = await snapshot(settings.asyncpg_dsn)
    from_scratch = await snapshot(fresh.asyncpg_dsn)
    assert len(after["tasks"]) == 30
    hidden = {(h["source"], h["source_task_id"]) for h in after["history"] if h["hidden"]}
    assert hidden == {("flux", "a0"), ("flux", "b0"), ("flux", "c0")}
    assert {"a:mj", "b:mj", "c:mj"} <= {h["source_task_id"] for h in after["history"]}
    assert differences(after["tasks"], from_scratch["tasks"]) == []
    assert differences(after["history"], from_scratch["history"]) == []
    assert after["schema"] == before["schema"] and after["constraints"] == before["constraints"]
    assert before["tasks"] == [t for t in after["tasks"] if not t["id"].startswith("c")]


async def test_a_second_replay_in_a_row_changes_nothing(bus, engine, settings, monkeypatch):
    await publish_mixed_run(bus, "d", n=6)
    with monkeypatch.context() as tls_only:  # the first reads through nats-py, as on a TLS server
        tls_only.setattr(logreader.LogReader, "open", classmethod(lambda cls, bus, settings: _none()))
        first = await replay(settings, bus)
    once = await snapshot(settings.asyncpg_dsn)
    second = await replay(settings, bus)  # the raw reader: the same rows
    assert first.through_seq == second.through_seq
    assert await snapshot(settings.asyncpg_dsn) == once
    assert await applied(engine) == first.through_seq
    # The swapped-in tables are exactly what the migrations make: no drift for Alembic.
    await asyncio.to_thread(command.check, alembic_config(Settings(DATABASE_URL=settings.database_url)))


async def test_replay_refuses_to_drop_rows_no_registered_read_model_rebuilds(bus, engine, settings):
    await publish_mixed_run(bus, "g", n=6)
    await replay(settings, bus)
    conn = await asyncpg.connect(settings.asyncpg_dsn)
    try:
        await conn.execute(
            "insert into image_history (source, source_task_id, user_id, image_url, created_at) "
            "values ('midjourney', 'mj1', 'alice', 'http://mj/1.png', now())"
        )
        with pytest.raises(RuntimeError, match="1 row\\(s\\) of image_history have no counterpart"):
            await replay(settings, bus)
        assert await conn.fetchval("select count(*) from image_history where source_task_id = 'mj1'") == 1
        await replay(settings, bus, force=True)
        assert await conn.fetchval("select count(*) from image_history where source_task_id = 'mj1'") == 0
    finally:
        await conn.close()


async def test_the_raw_reader_delivers_each_range_in_order_across_many_pulls(bus, settings, monkeypatch):
    monkeypatch.setattr(logreader, "BATCH", 7)  # many pull requests, several in flight
    await publish_mixed_run(bus, "r", n=3)
    last = (await bus.js.stream_info(bus.stream)).state.last_seq
    reader = await logreader.LogReader.open(bus, settings)
    assert reader is not None
    try:

        async def seqs(after: int, until: int) -> list[tuple[int, bool]]:
            return [
                (seq, REDRIVE_OF.encode() in logreader.header_names(headers))
                async for chunk in reader.read(after, until)
                for seq, _subject, headers, _data in chunk
            ]

        everything = await seqs(0, last)
        assert [seq for seq, _ in everything] == list(range(1, last + 1))
        assert [seq for seq, copy in everything if copy] == [last - 2]  # publish_mixed_run's re-drive
        # Ranges on the same connection: what an earlier read left in flight is never delivered.
        assert await seqs(0, 5) == everything[:5]
        assert await seqs(5, 9) == everything[5:9]
        assert await seqs(9, last) == everything[9:]
        assert await seqs(last, last) == []
    finally:
        await reader.close()


async def test_a_replay_folded_in_parallel_partitions_gives_the_same_rows(bus, engine, settings):
    await publish_mixed_run(bus, "p", n=12)
    # A task id that is no subject token: its task subjects carry it, its history subjects a
    # digest of it; both must land in the same partition.
    for event in task_story("p:x", "stored", user="user2"):
        await bus.publish(event)
    await bus.publish(HistoryItemHidden(task_id="p:x", user_id="user2", data=HIDE_FLUX))
    alone = await replay(settings, bus, workers=1)
    one = await snapshot(settings.asyncpg_dsn)
    parallel = await replay(settings, bus, workers=3)
    assert await snapshot(settings.asyncpg_dsn) == one
    assert (parallel.events, parallel.skipped) == (alone.events, alone.skipped)
    assert {h["source_task_id"] for h in one["history"] if h["hidden"]} == {"p0", "p:x"}
