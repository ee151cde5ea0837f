"""Folding the unified history: ``image_history``, one row per generated image item.

Three feeds fill it, all from the log: Flux tasks (a row once the task is SUCCESS with an
image, its URL switching to our stored copy when the uploader has one), ``HistoryItemRecorded``
for the other generators (Midjourney, Jimeng), and ``HistoryItemHidden`` when an owner hides
an item.

``fold_item`` and ``flux_item`` are pure: (row or None, stream seq, input) → row or None.
``apply_history`` runs inside the projector's batch transaction, after the task rows were
folded, so it shares their checkpoint.

Invariants:
- One row per (source, item id): a re-recorded item is an upsert, never a second row.
- ``image_url`` is ours before the provider's; a row exists only with an image.
- Hiding sticks: a later record or task event never un-hides a row, and only the row's owner
  can hide it (a hide by anyone else changes nothing).
- Events are applied in stream order within the batch, so a hide that follows the item's
  creation in the log also follows it here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

from sqlalchemy import Table, select, tuple_
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from schemas.catalog import MODELS
from schemas.events import FluxEvent, HistoryEvent, HistoryItemHidden, HistoryItemRecorded
from services.common.db import ImageHistory

history = cast(Table, ImageHistory.__table__)

Row = dict[str, Any]
Key = tuple[str, str]

SOURCE_TAGS = {"midjourney": "Midjourney", "jimeng": "Jimeng"}
COLUMNS = tuple(c.name for c in history.columns if c.name != "id")


def tag_of(source: str, model: str | None) -> str:
    """The label a history item shows: the Flux model's display name, else the generator's."""
    if source == "flux":
        spec = MODELS.get(model or "")
        return spec.name if spec is not None else (model or "FLUX")
    return SOURCE_TAGS.get(source, source)


def flux_item(current: Row | None, seq: int, task: Mapping[str, Any]) -> Row | None:
    """The history row of a Flux task row: present once it is SUCCESS with an image."""
    url = task["cloud_image_url"] or task["image_url"]
    if task["status"] != "SUCCESS" or not url:
        return current
    return {
        **(current or {}),
        "source": "flux",
        "source_task_id": task["id"],
        "user_id": task["user_id"],
        "model": task["model"],
        "tag": tag_of("flux", task["model"]),
        "prompt": task["prompt"],
        "status": "SUCCESS",
        "image_url": url,
        "provider_image_url": task["image_url"],
        "images": task["cloud_images"] or task["images"],
        "created_at": task["created_at"],
        "hidden": bool(current and current["hidden"]),
        "last_event_seq": seq,
    }


def fold_item(current: Row | None, seq: int, event: FluxEvent) -> Row | None:
    """The history row after a history event; ``current`` unchanged when it changes nothing."""
    match event:
        case HistoryItemRecorded(data=d):
            url = d.cloud_image_url or d.image_url
            if not url:
                return current
            return {
                **(current or {}),
                "source": d.source,
                "source_task_id": event.task_id,
                "user_id": event.user_id,
                "model": d.model,
                "tag": tag_of(d.source, d.model),
                "prompt": d.prompt,
                "status": d.status,
                "image_url": url,
                "provider_image_url": d.image_url,
                "images": None,
                "created_at": d.created_at,
                "hidden": bool(current and current["hidden"]),
                "last_event_seq": seq,
            }
        case HistoryItemHidden():
            if current is None or current["user_id"] != event.user_id or current["hidden"]:
                return current
            return {**current, "hidden": True, "last_event_seq": seq}
        case _:
            return current


def key_of(event: FluxEvent) -> Key:
    return (event.source if isinstance(event, HistoryEvent) else "flux", event.task_id)


def fold_history(
    current: Row | None, seq: int, event: FluxEvent, task: Mapping[str, Any] | None
) -> Row | None:
    """The history row after one event: a history event folds itself; a task event counts only
    when it changed the task's row, ``task`` being that row as it is after the event."""
    if isinstance(event, HistoryEvent):
        return fold_item(current, seq, event)
    if task is not None:
        return flux_item(current, seq, task)
    return current


Step = tuple[int, FluxEvent, Mapping[str, Any] | None]  # seq, event, the task row it produced


async def apply_history(conn: AsyncConnection, steps: Sequence[Step]) -> None:
    """Fold a batch into ``image_history``, event by event in stream order: the history events,
    and each task event that changed its task's row (with the row it produced). The result is
    the same however the log is cut into batches, which is what lets a replay equal it."""
    relevant = [step for step in steps if isinstance(step[1], HistoryEvent) or step[2] is not None]
    if not relevant:
        return
    keys = {key_of(event) for _, event, _ in relevant}
    found = await conn.execute(
        select(history).where(tuple_(history.c.source, history.c.source_task_id).in_(keys))
    )
    rows: dict[Key, Row] = {(r.source, r.source_task_id): dict(r._mapping) for r in found}
    changed: set[Key] = set()
    for seq, event, task in relevant:
        key = key_of(event)
        before = rows.get(key)
        after = fold_history(before, seq, event, task)
        if after is not None and after is not before:
            rows[key] = after
            changed.add(key)
    if not changed:
        return
    upsert = insert(history)
    await conn.execute(
        upsert.on_conflict_do_update(
            index_elements=[history.c.source, history.c.source_task_id],
            set_={name: upsert.excluded[name] for name in COLUMNS},
        ),
        [{name: rows[key].get(name) for name in COLUMNS} for key in sorted(changed)],
    )
