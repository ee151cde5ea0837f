"""``fluxpipe import-openwebui``: an Open WebUI deployment's ``mj_tasks`` (Midjourney) and
``dreamwork_tasks`` (Jimeng / Dreamina) rows → ``HistoryItemRecorded`` events, once.

Reads each table in primary-key order with a server-side cursor (a large table never sits in
memory) and records the rows that have an image. Open WebUI stores naive timestamps in UTC.
Re-running is harmless: items already recorded as they are are not published again.
The column mapping is documented in docs/HISTORY.md.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from typing import Any

import asyncpg

from schemas.events import ExternalSource, HistoryItemRecorded, HistoryItemRecordedData, TaskStatus
from services.common.bus import Bus
from services.ingest.record import record_items

TABLES: dict[str, ExternalSource] = {"mj_tasks": "midjourney", "dreamwork_tasks": "jimeng"}
BATCH = 1000
MAX_ID = 64

# Open WebUI's task states (Midjourney proxy and Dreamina vocabularies) → ours.
STATUSES: dict[str, TaskStatus] = {
    "SUCCESS": "SUCCESS",
    "SUCCEEDED": "SUCCESS",
    "FAILURE": "FAILED",
    "FAILED": "FAILED",
    "CANCEL": "CANCELLED",
    "CANCELLED": "CANCELLED",
    "IN_PROGRESS": "IN_PROGRESS",
    "RUNNING": "IN_PROGRESS",
    "IN_QUEUE": "IN_QUEUE",
    "QUEUED": "IN_QUEUE",
}


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).replace("\x00", "").strip()
    return text or None


def item_event(source: ExternalSource, row: Mapping[str, Any]) -> HistoryItemRecorded | None:
    """The event of one Open WebUI row; None when it cannot be an item (no image, no owner,
    no time, an id too long for the history)."""
    item_id, user_id = _text(row.get("id")), _text(row.get("user_id"))
    image_url, cloud_image_url = _text(row.get("image_url")), _text(row.get("cloud_image_url"))
    created_at = next(
        (t for key in ("created_at", "submit_time", "finish_time") if (t := _utc(row.get(key)))), None
    )
    if not item_id or len(item_id) > MAX_ID or not user_id or not created_at:
        return None
    if not (image_url or cloud_image_url):
        return None
    status = STATUSES.get((_text(row.get("status")) or "").upper(), "PENDING")
    return HistoryItemRecorded(
        task_id=item_id,
        user_id=user_id,
        data=HistoryItemRecordedData(
            source=source,
            status=status,
            model=(_text(row.get("model")) or "")[:100] or None,
            prompt=_text(row.get("prompt")) or _text(row.get("prompt_en")),
            image_url=image_url,
            cloud_image_url=cloud_image_url,
            created_at=created_at,
        ),
    )


async def _rows(conn: asyncpg.Connection, table: str) -> AsyncIterator[list[asyncpg.Record]]:
    async with conn.transaction(readonly=True):
        cursor = await conn.cursor(f'SELECT * FROM "{table}" ORDER BY id')
        while batch := await cursor.fetch(BATCH):
            yield batch


async def import_openwebui(bus: Bus, database_url: str) -> dict[str, Counter[str]]:
    """Import both tables (a missing table counts as empty); per source, what happened."""
    report: dict[str, Counter[str]] = {}
    conn = await asyncpg.connect(database_url)
    try:
        present = {r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables")}
        for table, source in TABLES.items():
            counts: Counter[str] = Counter()
            if table not in present:
                counts["missing table"] = 1
            else:
                async for batch in _rows(conn, table):
                    events = [e for row in batch if (e := item_event(source, row)) is not None]
                    counts["skipped"] += len(batch) - len(events)
                    counts.update(await record_items(bus, events))
            report[source] = counts
    finally:
        await conn.close()
    return report
