"""The projector folds the log into flux_tasks and image_history, exactly once."""

from __future__ import annotations

import asyncio

import asyncpg
from nats.js.errors import NotFoundError
from sqlalchemy import select

from schemas.events import (
    ImagesStored,
    ImagesStoredData,
    ProviderImage,
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
)
from services.common.db import FluxTask, ImageHistory
from services.common.settings import Settings
from services.projector.main import project
from services.projector.projection import apply_batch, load_checkpoint
from tests.test_bus import wait_for

IDS = {"task_id": "task1", "user_id": "alice"}


def story() -> list:
    return [
        TaskRequested(
            **IDS,
            data=TaskRequestedData(
                model="fal-ai/flux-1/dev",
                task_type="text_to_image",
                prompt="a fox",
                aspect_ratio="1:1",
                seed=7,
            ),
        ),
        TaskSubmitted(
            **IDS,
            data=TaskSubmittedData(
                request_id="req1", status_url="s", response_url="r", cancel_url="c", queue_position=3
            ),
        ),
        TaskStatusChanged(**IDS, data=TaskStatusChangedData(status="IN_PROGRESS", seq=1)),
        TaskCompleted(
            **IDS,
            data=TaskCompletedData(
                request_id="req1",
                images=(ProviderImage(url="https://fal/1.jpg", width=1024, height=1024),),
                seed=7,
                generation_time=1.5,
            ),
        ),
        ImagesStored(
            **IDS,
            data=ImagesStoredData(
                images=(
                    StoredImage(
                        url="http://gw/files/x.jpg",
                        key="x.jpg",
                        content_type="image/jpeg",
                        width=1024,
                        height=1024,
                        size=9,
                    ),
                )
            ),
        ),
    ]


async def fetch_task(engine, task_id="task1"):
    async with engine.connect() as conn:
        return (await conn.execute(select(FluxTask.__table__).where(FluxTask.id == task_id))).first()


async def test_a_story_folds_into_one_row_and_one_history_entry(engine):
    events = list(enumerate(story(), start=1))
    async with engine.begin() as conn:
        assert await apply_batch(conn, events) == 5
    row = await fetch_task(engine)
    assert row.status == "SUCCESS"
    assert row.request_id == "req1"
    assert row.image_url == "https://fal/1.jpg"
    assert row.cloud_image_url == "http://gw/files/x.jpg"
    assert row.generation_time == 1.5
    assert row.completed_at is not None and row.last_event_seq == 5
    async with engine.connect() as conn:
        hist = (await conn.execute(select(ImageHistory.__table__))).all()
    assert [(h.source, h.source_task_id, h.image_url) for h in hist] == [
        ("flux", "task1", "http://gw/files/x.jpg")
    ]


async def test_redelivered_events_are_skipped_by_the_checkpoint(engine):
    events = list(enumerate(story(), start=1))
    async with engine.begin() as conn:
        await apply_batch(conn, events[:3])
    async with engine.begin() as conn:
        assert await apply_batch(conn, events) == 2
    async with engine.begin() as conn:
        assert await apply_batch(conn, events) == 0
        assert await load_checkpoint(conn) == 5
    assert (await fetch_task(engine)).status == "SUCCESS"


async def test_terminal_state_never_regresses(engine):
    events = story()[:4] + [
        TaskStatusChanged(**IDS, data=TaskStatusChangedData(status="IN_QUEUE", seq=2)),
        TaskFailed(**IDS, data=TaskFailedData(stage="poll", error="late failure")),
    ]
    async with engine.begin() as conn:
        await apply_batch(conn, list(enumerate(events, start=1)))
    row = await fetch_task(engine)
    assert row.status == "SUCCESS" and row.error_message is None


async def test_projector_follows_the_stream_and_resumes_from_its_checkpoint(bus, engine):
    first, rest = story()[:2], story()[2:]
    for event in first:
        await bus.publish(event)
    stop = asyncio.Event()
    runner = asyncio.create_task(project(bus, engine, stop))

    await wait_for(lambda: status_is(engine, "IN_QUEUE"))
    stop.set()
    await runner

    for event in rest:
        await bus.publish(event)
    stop = asyncio.Event()
    runner = asyncio.create_task(project(bus, engine, stop))
    await wait_for(lambda: status_is(engine, "SUCCESS"))
    await wait_for(lambda: history_count(engine, 1))
    stop.set()
    await runner
    last_seq = (await bus.js.stream_info(bus.stream)).state.last_seq
    async with engine.connect() as conn:
        assert await load_checkpoint(conn) == last_seq


async def test_the_projector_rides_out_a_database_outage_without_losing_or_doubling_events(
    bus, engine, pg_server_url, database_url
):
    admin = await asyncpg.connect(Settings(DATABASE_URL=pg_server_url).asyncpg_dsn)
    name = engine.url.database
    stop = asyncio.Event()
    runner = asyncio.create_task(project(bus, engine, stop))
    events = story()
    await bus.publish(events[0])
    await wait_for(lambda: status_is(engine, "PENDING"))
    try:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name)
        for event in events[1:]:
            await bus.publish(event)
        await asyncio.sleep(1.5)  # the projector meets the outage and keeps retrying
        assert not runner.done()
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()
    await wait_for(lambda: status_is(engine, "SUCCESS"))
    await wait_for(lambda: history_count(engine, 1))
    stop.set()
    await runner
    row = await fetch_task(engine)
    assert row.cloud_image_url == "http://gw/files/x.jpg" and row.last_event_seq == 5
    async with engine.connect() as conn:
        assert await load_checkpoint(conn) == 5


async def status_is(engine, expected: str) -> bool:
    row = await fetch_task(engine)
    return row is not None and row.status == expected


async def history_count(engine, expected: int) -> bool:
    """Whether ``expected`` history items show our stored copy (a story's last step)."""
    table = ImageHistory.__table__
    async with engine.connect() as conn:
        rows = (
            await conn.execute(select(table).where(table.c.image_url != table.c.provider_image_url))
        ).all()
        return len(rows) == expected


async def test_an_event_that_cannot_be_projected_is_dead_lettered_and_the_rest_go_on(bus, engine):
    poison = TaskRequested(
        task_id="bad",
        user_id="mallory",
        data=TaskRequestedData(model="fal-ai/flux-1/dev", task_type="text_to_image", prompt="a\x00b"),
    )
    await bus.publish(poison)
    await bus.js.publish(
        bus.task_subject("odd", "requested"), b'{"type": "task.from_the_future"}', stream=bus.stream
    )
    for event in story():
        await bus.publish(event)
    stop = asyncio.Event()
    runner = asyncio.create_task(project(bus, engine, stop))
    await wait_for(lambda: history_count(engine, 1))
    await wait_for(lambda: caught_up(bus, engine))  # also past the dead letters it published
    stop.set()
    await runner

    assert (await fetch_task(engine)).status == "SUCCESS"
    assert await fetch_task(engine, "bad") is None
    parked = {m.headers["Fluxpipe-Subject"]: m.headers["Fluxpipe-Reason"] async for m in dead_letters(bus)}
    assert parked.keys() == {bus.task_subject("bad", "requested"), bus.task_subject("odd", "requested")}
    assert "cannot be projected" in parked[bus.task_subject("bad", "requested")]
    assert "undecodable event" in parked[bus.task_subject("odd", "requested")]


async def caught_up(bus, engine) -> bool:
    last = max(seq for seq, _, _ in [r async for r in bus.iter_raw(bus.events_subject())])
    async with engine.connect() as conn:
        return await load_checkpoint(conn) == last


async def dead_letters(bus, durable="projector"):
    seq = 1
    while True:
        try:
            msg = await bus.js.get_msg(bus.stream, seq=seq, subject=bus.dlq_subject(durable), next=True)
        except NotFoundError:
            return
        yield msg
        seq = msg.seq + 1


async def test_a_database_that_answers_but_refuses_writes_pauses_the_projector_and_loses_nothing(
    bus, engine, pg_server_url, database_url
):
    admin = await asyncpg.connect(Settings(DATABASE_URL=pg_server_url).asyncpg_dsn)
    name = engine.url.database

    async def sessions_become(setting: str) -> None:
        await admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = {setting}')
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name)

    stop = asyncio.Event()
    runner = asyncio.create_task(project(bus, engine, stop))
    try:
        await sessions_become("on")  # like a full disk or a failed-over replica: select 1 still works
        for event in story():
            await bus.publish(event)
        await asyncio.sleep(1.5)
        assert not runner.done()
        assert [m async for m in dead_letters(bus)] == []
    finally:
        await sessions_become("off")
        await admin.close()
    await wait_for(lambda: history_count(engine, 1))
    stop.set()
    await runner
    assert (await fetch_task(engine)).status == "SUCCESS"


async def test_many_unprojectable_events_in_a_row_pause_the_projector_instead_of_parking_them_all(
    bus, engine
):
    from services.projector.main import BREAKER

    for i in range(BREAKER + 3):
        await bus.publish(
            TaskRequested(
                task_id=f"bad{i}",
                user_id="u",
                data=TaskRequestedData(model="fal-ai/flux-1/dev", task_type="text_to_image", prompt="\x00"),
            )
        )
    stop = asyncio.Event()
    runner = asyncio.create_task(project(bus, engine, stop))

    async def parked(n: int) -> bool:
        return len([m async for m in dead_letters(bus)]) == n

    await wait_for(lambda: parked(BREAKER))
    await asyncio.sleep(1)
    assert await parked(BREAKER) and not runner.done()
    stop.set()
    await runner
    async with engine.connect() as conn:
        assert await load_checkpoint(conn) == BREAKER  # the rest wait for a fix, not lost
