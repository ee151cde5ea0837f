"""Retry lineage read from the read model: which tasks retry a given task."""

from __future__ import annotations

from typing import cast

from sqlalchemy import Table, select
from sqlalchemy.ext.asyncio import AsyncConnection

from services.common.db import FluxTask

tasks = cast(Table, FluxTask.__table__)


async def retries_of(conn: AsyncConnection, task_ids: list[str]) -> dict[str, list[str]]:
    """For each task id, the tasks retrying it (``retry_of`` = that id), oldest first."""
    if not task_ids:
        return {}
    rows = await conn.execute(
        select(tasks.c.retry_of, tasks.c.id)
        .where(tasks.c.retry_of.in_(task_ids))
        .order_by(tasks.c.created_at, tasks.c.id)
    )
    found: dict[str, list[str]] = {}
    for retry_of, task_id in rows:
        found.setdefault(retry_of, []).append(task_id)
    return found
