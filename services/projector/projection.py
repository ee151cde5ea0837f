"""Folding events into the read models: ``flux_tasks`` and the unified ``image_history``.

``fold_task`` is pure: (row or None, stream seq, event) → new row or None. ``apply_batch``
loads the batch's rows in one query, folds every event in memory, and writes the changed rows
back in one upsert, so a batch costs a handful of round trips, not one per event.

Invariants:
- ``apply_batch`` runs in one transaction that also moves the checkpoint, with the
  checkpoint row locked: an event is applied exactly once even if it is delivered twice or
  two projector replicas race.
- Terminal states never regress: a late status event after SUCCESS/FAILED/CANCELLED is ignored.
- An event for a task whose ``TaskRequested`` was never applied changes nothing.
- Images keep fal's order; each carries its ``has_nsfw_concepts`` flag, also on the stored copies.
- Configuration and credit events are folded in the same transaction by
  ``services/projector/credits.py`` (``flux_config``, ``flux_credits``, ``flux_credit_ledger``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import Table, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from schemas.events import (
    TERMINAL_STATUSES,
    FluxEvent,
    ImagesStored,
    StorageFailed,
    TaskCancelled,
    TaskCompleted,
    TaskFailed,
    TaskRequested,
    TaskStatusChanged,
    TaskSubmitted,
)
from services.common.db import FluxTask, ImageHistory, ProjectorCheckpoint
from services.projector.credits import apply_side_models
from services.projector.history import Step, apply_history

CHECKPOINT = "flux_tasks"

tasks = cast(Table, FluxTask.__table__)
history = cast(Table, ImageHistory.__table__)
checkpoints = cast(Table, ProjectorCheckpoint.__table__)

Row = dict[str, Any]


async def load_checkpoint(conn: AsyncConnection, *, lock: bool = False) -> int:
    await conn.execute(insert(checkpoints).values(name=CHECKPOINT, stream_seq=0).on_conflict_do_nothing())
    query = select(checkpoints.c.stream_seq).where(checkpoints.c.name == CHECKPOINT)
    if lock:
        query = query.with_for_update()
    return int((await conn.execute(query)).scalar_one())


def new_row(seq: int, event: TaskRequested) -> Row:
    d = event.data
    return {
        "id": event.task_id,
        "user_id": event.user_id,
        "request_id": None,
        "model": d.model,
        "task_type": d.task_type,
        "status": "PENDING",
        "prompt": d.prompt,
        "input_image_url": d.image_urls[0] if d.image_urls else None,
        "input_image_urls": list(d.image_urls) or None,
        "uploaded_image_url": None,
        "num_images": d.num_images,
        "aspect_ratio": d.aspect_ratio,
        "guidance_scale": d.guidance_scale,
        "num_inference_steps": d.num_inference_steps,
        "seed": d.seed,
        "safety_tolerance": d.safety_tolerance,
        "strength": d.strength,
        "output_format": d.output_format,
        "image_url": None,
        "cloud_image_url": None,
        "images": None,
        "cloud_images": None,
        "generation_time": None,
        "queue_position": None,
        "error_message": None,
        "storage_error": None,
        "retry_count": 0,
        "last_event_seq": seq,
        "created_at": event.occurred_at,
        "updated_at": event.occurred_at,
        "completed_at": None,
        "failure_stage": None,
    }


def fold_task(row: Row | None, seq: int, event: FluxEvent) -> Row | None:
    """The task row after ``event``; ``row`` itself (unchanged) when the event changes nothing."""
    if isinstance(event, TaskRequested):
        return row if row is not None else new_row(seq, event)
    if row is None:
        return None
    live = row["status"] not in TERMINAL_STATUSES
    changes: Row
    match event:
        case TaskSubmitted(data=d) if live:
            changes = {"request_id": d.request_id, "status": "IN_QUEUE", "queue_position": d.queue_position}
        case TaskStatusChanged(data=d) if live:
            changes = {"status": d.status, "queue_position": d.queue_position}
        case TaskCompleted(data=d) if live:
            images = with_nsfw_flags([img.model_dump() for img in d.images], d.has_nsfw_concepts)
            changes = {
                "status": "SUCCESS",
                "request_id": d.request_id,
                "image_url": images[0]["url"] if images else None,
                "images": images,
                "seed": d.seed if d.seed is not None else row["seed"],
                "generation_time": d.generation_time,
                "queue_position": None,
                "completed_at": event.occurred_at,
            }
        case TaskFailed(data=d) if live:
            changes = {
                "status": "FAILED",
                "error_message": d.error,
                "completed_at": event.occurred_at,
                "failure_stage": d.stage,
            }
        case TaskCancelled(data=d) if live:
            changes = {"status": "CANCELLED", "error_message": d.reason, "completed_at": event.occurred_at}
        case ImagesStored(data=d):
            flags = [img.get("has_nsfw_concepts") for img in row["images"] or []]
            stored = with_nsfw_flags([img.model_dump() for img in d.images], flags)
            if not stored:
                return row
            changes = {"cloud_image_url": stored[0]["url"], "cloud_images": stored, "storage_error": None}
        case StorageFailed(data=d):
            changes = {"storage_error": d.error}
        case _:
            return row
    return {**row, **changes, "updated_at": event.occurred_at, "last_event_seq": seq}


def with_nsfw_flags(images: list[Row], flags: Sequence[bool | None]) -> list[Row]:
    """Each image with fal's ``has_nsfw_concepts`` flag of the same index (``None`` if unknown)."""
    padded = [*flags, *[None] * len(images)][: len(images)]
    return [{**img, "has_nsfw_concepts": flag} for img, flag in zip(images, padded, strict=True)]


async def apply_batch(
    conn: AsyncConnection, batch: Sequence[tuple[int, FluxEvent]], *, last_seq: int = 0
) -> int:
    """Apply events (stream seq, event) in order inside the caller's transaction and move the
    checkpoint to the last of them, or to ``last_seq`` if that is further (past messages that
    were dead-lettered instead of applied).

    Returns how many were applied; events at or below the checkpoint are skipped.
    """
    done = await load_checkpoint(conn, lock=True)
    pending = [(seq, event) for seq, event in batch if seq > done]
    target = max([seq for seq, _ in pending] + [last_seq])
    if target <= done:
        return 0
    ids = {event.task_id for _, event in pending}
    result = await conn.execute(select(tasks).where(tasks.c.id.in_(ids)))
    rows: dict[str, Row] = {r.id: dict(r._mapping) for r in result}
    changed: set[str] = set()
    steps: list[Step] = []
    for seq, event in pending:
        before = rows.get(event.task_id)
        after = fold_task(before, seq, event)
        if after is not None and after is not before:
            rows[event.task_id] = after
            changed.add(event.task_id)
            steps.append((seq, event, after))
        else:
            steps.append((seq, event, None))
    if changed:
        upsert = insert(tasks)
        await conn.execute(
            upsert.on_conflict_do_update(
                index_elements=[tasks.c.id],
                set_={c.name: upsert.excluded[c.name] for c in tasks.columns if c.name != "id"},
            ),
            [rows[task_id] for task_id in changed],
        )
    await apply_history(conn, steps)
    await apply_side_models(conn, pending)
    await conn.execute(
        update(checkpoints)
        .where(checkpoints.c.name == CHECKPOINT)
        .values(stream_seq=target, updated_at=func.now())
    )
    return len(pending)
