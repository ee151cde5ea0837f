"""The unified history's HTTP contract: the page, its items and the opaque keyset cursor."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime

from pydantic import BaseModel

from schemas.events import HistorySource, TaskStatus


class HistoryItemOut(BaseModel):
    """One image item, whatever generator made it. ``id`` is ``<source>:<item id>``."""

    id: str
    source: HistorySource
    task_id: str
    tag: str | None = None
    model: str | None = None
    prompt: str | None = None
    status: TaskStatus
    image_url: str
    provider_image_url: str | None = None
    created_at: datetime


class UnifiedHistoryPage(BaseModel):
    items: list[HistoryItemOut]
    page: int | None
    limit: int
    next_cursor: str | None = None


class ItemHidden(BaseModel):
    id: str
    hidden: bool = True


class BadCursor(ValueError):
    pass


def encode_cursor(created_at: datetime, row_id: int) -> str:
    """The position after an item, as an opaque token (its (created_at, id) key)."""
    raw = json.dumps([created_at.isoformat(), row_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        when, row_id = json.loads(raw)
        created_at = datetime.fromisoformat(when)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise BadCursor("not a cursor this server issued") from exc
    if not isinstance(row_id, int) or created_at.tzinfo is None:
        raise BadCursor("not a cursor this server issued")
    return created_at, row_id
