"""The unified history's read model: its pure folds, the projector feeding it, and its indexes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Select, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from schemas.events import (
    HistoryItemHidden,
    HistoryItemHiddenData,
    HistoryItemRecorded,
    HistoryItemRecordedData,
    decode_event,
    encode_event,
)
from schemas.history import BadCursor, decode_cursor, encode_cursor
from services.common.db import ImageHistory
from services.gateway.routes.history import page_query
from services.projector.history import flux_item, fold_item
from services.projector.projection import apply_batch
from tests.test_projector import story

WHEN = datetime(2025, 5, 1, 12, tzinfo=UTC)


def recorded(item_id: str = "mj1", user: str = "alice", **data: object) -> HistoryItemRecorded:
    fields: dict = {
        "source": "midjourney",
        "status": "SUCCESS",
        "image_url": "https://mj/1.png",
        "created_at": WHEN,
    }
    return HistoryItemRecorded(task_id=item_id, user_id=user, data=HistoryItemRecordedData(**(fields | data)))


def hidden(item_id: str = "mj1", user: str = "alice", source: str = "midjourney") -> HistoryItemHidden:
    return HistoryItemHidden(task_id=item_id, user_id=user, data=HistoryItemHiddenData(source=source))


def test_history_events_round_trip_on_their_own_subjects() -> None:
    event = recorded("id with spaces.and.dots")
    assert decode_event(encode_event(event)) == event
    assert event.subject("flux").startswith("flux.history.midjourney.h")  # a digest: one safe token
    assert len(event.subject("flux").split(".")) == 5
    assert recorded().subject("flux") == "flux.history.midjourney.mj1.recorded"
    assert hidden().subject("flux") == "flux.history.midjourney.mj1.hidden"
    assert recorded().msg_id == recorded().msg_id != recorded(prompt="changed").msg_id


def test_an_item_prefers_our_copy_and_hiding_sticks_for_its_owner_only() -> None:
    row = fold_item(None, 1, recorded(cloud_image_url="https://ours/1.png"))
    assert row is not None
    assert (row["image_url"], row["provider_image_url"], row["tag"]) == (
        "https://ours/1.png",
        "https://mj/1.png",
        "Midjourney",
    )
    assert fold_item(row, 2, hidden(user="mallory")) is row  # not theirs: nothing changes
    gone = fold_item(row, 3, hidden())
    assert gone is not None and gone["hidden"] and gone["last_event_seq"] == 3
    again = fold_item(gone, 4, recorded(prompt="re-imported"))
    assert again is not None and again["hidden"] and again["prompt"] == "re-imported"
    assert fold_item(None, 5, recorded(image_url=None)) is None  # no image: no item
    assert fold_item(None, 6, hidden()) is None


def test_a_flux_task_is_an_item_once_it_succeeded_with_an_image() -> None:
    task = {
        "id": "t1",
        "user_id": "alice",
        "model": "fal-ai/flux-1/schnell",
        "prompt": "p",
        "status": "IN_PROGRESS",
        "image_url": None,
        "cloud_image_url": None,
        "images": None,
        "cloud_images": None,
        "created_at": WHEN,
    }
    assert flux_item(None, 1, task) is None
    done = {**task, "status": "SUCCESS", "image_url": "https://fal/1.jpg"}
    first = flux_item(None, 2, done)
    assert (
        first is not None and first["image_url"] == "https://fal/1.jpg" and first["tag"] == "FLUX.1 Schnell"
    )
    stored = flux_item(first, 3, {**done, "cloud_image_url": "https://ours/1.jpg"})
    assert stored is not None and stored["image_url"] == "https://ours/1.jpg"
    assert stored["provider_image_url"] == "https://fal/1.jpg"


def test_cursors_round_trip_and_foreign_ones_are_refused() -> None:
    assert decode_cursor(encode_cursor(WHEN, 42)) == (WHEN, 42)
    for bad in ("", "abc", encode_cursor(WHEN, 1)[:-3], "W10"):
        with pytest.raises(BadCursor):
            decode_cursor(bad)


async def test_the_projector_folds_flux_and_other_items_and_hides_in_log_order(engine) -> None:
    flux = story()  # requested … completed, images stored: one Flux item for alice
    others = [recorded(), recorded("mj2", user="bob"), hidden("task1", source="flux"), hidden("mj2")]
    async with engine.begin() as conn:
        await apply_batch(conn, list(enumerate(flux + others, start=1)))
    async with engine.connect() as conn:
        rows = (await conn.execute(select(ImageHistory.__table__).order_by("source"))).all()
    assert [(r.source, r.source_task_id, r.user_id, r.hidden) for r in rows] == [
        ("flux", "task1", "alice", True),
        ("midjourney", "mj1", "alice", False),
        ("midjourney", "mj2", "bob", False),  # alice cannot hide bob's item
    ]
    assert rows[0].image_url == "http://gw/files/x.jpg" and rows[0].tag == "FLUX.1 Dev"


ROWS = 150_000
USERS = 500


async def explain(engine: AsyncEngine, query: Select) -> str:
    compiled = query.compile(dialect=engine.dialect)
    args = [compiled.params[name] for name in compiled.positiontup or ()]
    async with engine.connect() as conn:
        driver = (await conn.get_raw_connection()).driver_connection
        assert driver is not None
        plan = await driver.fetch("EXPLAIN " + str(compiled), *args)
    return "\n".join(r[0] for r in plan)


async def test_every_page_query_reads_a_per_user_index_not_the_table(engine) -> None:
    """EXPLAIN of the route's own queries on a table of 150k items, 500 users."""
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO image_history (source, source_task_id, user_id, model, prompt, image_url,"
                " created_at, status) SELECT (ARRAY['flux','midjourney','jimeng'])[1 + i % 3], 'i' || i,"
                f" 'user' || (i % {USERS}), (ARRAY['fal-ai/flux-1/dev','fal-ai/flux-1/schnell'])[1 + i % 2],"
                " 'prompt ' || i, 'https://x/' || i, timestamptz '2025-01-01' + i * interval '1 minute',"
                f" 'SUCCESS' FROM generate_series(1, {ROWS}) AS i"
            )
        )
        await conn.execute(text("ANALYZE image_history"))
    after = (datetime(2025, 3, 1, tzinfo=UTC), 10**9)
    queries = {
        "ix_image_history_user_id_created_at_id": [
            page_query("user7"),
            page_query("user7", after=after),
            page_query("user7", since=after[0] - timedelta(days=5), until=after[0]),
            page_query("user7", offset=100),
        ],
        "ix_image_history_user_id_source_created_at_id": [page_query("user7", source="jimeng", after=after)],
        "ix_image_history_user_id_model_created_at_id": [page_query("user7", model="fal-ai/flux-1/dev")],
        "ix_image_history_user_id_": [page_query("user7", q="prompt 12")],  # the user's rows, filtered
    }
    for index, group in queries.items():
        for query in group:
            plan = await explain(engine, query)
            assert "Seq Scan" not in plan and index in plan, plan  # an index scan, or a bitmap one
