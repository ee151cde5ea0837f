"""``/api/flux/unified-history``: one list of generated images across Flux, Midjourney, Jimeng.

Reads ``image_history`` (the projector's read model) and publishes ``HistoryItemHidden``; it
never writes a table. Only the caller's own items, newest first by (created_at, id).

Paging: ``page`` (OFFSET, as the plan has it) or ``cursor`` (keyset on (created_at, id)).
A cursor names a position, not an offset, so items arriving meanwhile never make a page skip
or repeat an item; every filter is served by a per-user index (see the migration 0106).
A hide takes effect once the projector applied it (the answer is 202).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, cast

from fastapi import APIRouter, HTTPException, Query, status
from sqlalchemy import Select, Table, and_, select, tuple_

from schemas.events import HistoryItemHidden, HistoryItemHiddenData, HistorySource, TaskStatus
from schemas.history import (
    BadCursor,
    HistoryItemOut,
    ItemHidden,
    UnifiedHistoryPage,
    decode_cursor,
    encode_cursor,
)
from services.common.db import ImageHistory
from services.common.storage import Storage, fresh_url
from services.gateway.deps import BusDep, CurrentUser, EngineDep, StorageDep

router = APIRouter(prefix="/api/flux", tags=["history"])

history = cast(Table, ImageHistory.__table__)
SOURCES: tuple[str, ...] = HistorySource.__args__  # type: ignore[attr-defined]


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def item_out(row: Any, storage: Storage | None = None) -> HistoryItemOut:
    """One item; our stored copy's URL made fetchable now (signed afresh for a private bucket)."""
    image_url = fresh_url(storage, row.image_url) if storage is not None else row.image_url
    return HistoryItemOut(
        id=f"{row.source}:{row.source_task_id}",
        source=row.source,
        task_id=row.source_task_id,
        tag=row.tag,
        model=row.model,
        prompt=row.prompt,
        status=row.status,
        image_url=image_url,
        provider_image_url=row.provider_image_url,
        created_at=row.created_at,
    )


def page_query(
    user_id: str,
    *,
    status: str = "SUCCESS",
    source: str | None = None,
    model: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    q: str | None = None,
    after: tuple[datetime, int] | None = None,
    limit: int = 20,
    offset: int = 0,
) -> Select[Any]:
    """One page of a user's visible items, newest first: after the key ``after`` (keyset) or
    ``offset`` rows in. Each filter keeps the per-user partial indexes usable."""
    where = [history.c.user_id == user_id, ~history.c.hidden, history.c.status == status]
    if source is not None:
        where.append(history.c.source == source)
    if model is not None:
        where.append(history.c.model == model)
    if since is not None:
        where.append(history.c.created_at >= since)
    if until is not None:
        where.append(history.c.created_at < until)
    if q:
        where.append(history.c.prompt.ilike(_like(q), escape="\\"))
    if after is not None:
        where.append(tuple_(history.c.created_at, history.c.id) < tuple_(*after))
    return (
        select(history)
        .where(and_(*where))
        .order_by(history.c.created_at.desc(), history.c.id.desc())
        .limit(limit)
        .offset(offset)
    )


@router.get("/unified-history", response_model=UnifiedHistoryPage)
async def unified_history(
    user: CurrentUser,
    engine: EngineDep,
    storage: StorageDep,
    page: Annotated[int, Query(ge=1)] = 1,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    source: HistorySource | None = None,
    model: Annotated[str | None, Query(max_length=100)] = None,
    status_: Annotated[TaskStatus, Query(alias="status")] = "SUCCESS",
    since: Annotated[datetime | None, Query(description="created at or after (ISO 8601)")] = None,
    until: Annotated[datetime | None, Query(description="created before (ISO 8601)")] = None,
    q: Annotated[str | None, Query(max_length=200, description="text in the prompt")] = None,
    cursor: Annotated[str | None, Query(max_length=200, description="next_cursor of a page")] = None,
) -> UnifiedHistoryPage:
    """The caller's generated images across every generator, newest first (hidden ones left out)."""
    if cursor is not None and page != 1:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "page and cursor: give one or the other")
    for name, value in (("since", since), ("until", until)):
        if value is not None and value.tzinfo is None:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT, f"{name}: give a time zone (e.g. Z or +08:00)"
            )
    after = None
    if cursor is not None:
        try:
            after = decode_cursor(cursor)
        except BadCursor as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"cursor: {exc}") from exc
    query = page_query(
        user.user_id,
        status=status_,
        source=source,
        model=model,
        since=since,
        until=until,
        q=q,
        after=after,
        limit=limit + 1,
        offset=0 if after is not None else (page - 1) * limit,
    )
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    more, rows = len(rows) > limit, rows[:limit]
    return UnifiedHistoryPage(
        items=[item_out(r, storage) for r in rows],
        page=None if cursor is not None else page,
        limit=limit,
        next_cursor=encode_cursor(rows[-1].created_at, rows[-1].id) if more else None,
    )


async def _hide(item_id: str, user: CurrentUser, engine: EngineDep, bus: BusDep) -> ItemHidden:
    source, _, task_id = item_id.partition(":")
    missing = HTTPException(status.HTTP_404_NOT_FOUND, f"history item {item_id!r} not found")
    if source not in SOURCES or not task_id:
        raise missing
    mine = and_(
        history.c.source == source,
        history.c.source_task_id == task_id,
        history.c.user_id == user.user_id,
    )
    async with engine.connect() as conn:
        found = (await conn.execute(select(history.c.id).where(mine))).first()
    if found is None:
        raise missing
    await bus.publish(
        HistoryItemHidden(
            task_id=task_id, user_id=user.user_id, data=HistoryItemHiddenData(source=cast(Any, source))
        )
    )
    return ItemHidden(id=item_id)


@router.delete("/unified-history/{item_id}", status_code=status.HTTP_202_ACCEPTED, response_model=ItemHidden)
async def delete_history_item(item_id: str, user: CurrentUser, engine: EngineDep, bus: BusDep) -> ItemHidden:
    """Hide one of the caller's items from their unified history (the image itself stays)."""
    return await _hide(item_id, user, engine, bus)


@router.post(
    "/unified-history/{item_id}/hide", status_code=status.HTTP_202_ACCEPTED, response_model=ItemHidden
)
async def hide_history_item(item_id: str, user: CurrentUser, engine: EngineDep, bus: BusDep) -> ItemHidden:
    """Hide one of the caller's items from their unified history (same as ``DELETE``)."""
    return await _hide(item_id, user, engine, bus)
