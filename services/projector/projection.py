"""Folding events into the read models: ``flux_tasks`` and the unified ``image_history``.

Invariants:
- ``apply_batch`` runs in one transaction that also moves the checkpoint, with the
  checkpoint row locked: an event is applied exactly once even if it is delivered twice or
  two projector replicas race.
- Terminal states never regress: a late status event after SUCCESS/FAILED/CANCELLED is ignored.
- Every statement is keyed by task id, so applying the same story twice gives the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import Table, and_, func, not_, select, update
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

CHECKPOINT = "flux_tasks"

tasks = cast(Table, FluxTask.__table__)
history = cast(Table, ImageHistory.__table__)
checkpoints = cast(Table, ProjectorCheckpoint.__table__)


async def load_checkpoint(conn: AsyncConnection, *, lock: bool = False) -> int:
    await conn.execute(insert(checkpoints).values(name=CHECKPOINT, stream_seq=0).on_conflict_do_nothing())
    query = select(checkpoints.c.stream_seq).where(checkpoints.c.name == CHECKPOINT)
    if lock:
        query = query.with_for_update()
    return int((await conn.execute(query)).scalar_one())


async def apply_batch(conn: AsyncConnection, batch: Sequence[tuple[int, FluxEvent]]) -> int:
    """Apply events (stream seq, event) in order inside the caller's transaction.

    Returns how many were applied; events at or below the checkpoint are skipped.
    """
    done = await load_checkpoint(conn, lock=True)
    applied = 0
    for seq, event in batch:
        if seq <= done:
            continue
        await apply_event(conn, seq, event)
        done = seq
        applied += 1
    if applied:
        await conn.execute(
            update(checkpoints)
            .where(checkpoints.c.name == CHECKPOINT)
            .values(stream_seq=done, updated_at=func.now())
        )
    return applied


def _task(event: FluxEvent, *, live_only: bool = True) -> Any:
    cond = tasks.c.id == event.task_id
    if live_only:
        cond = and_(cond, not_(tasks.c.status.in_(TERMINAL_STATUSES)))
    return update(tasks).where(cond)


async def apply_event(conn: AsyncConnection, seq: int, event: FluxEvent) -> None:
    common = {"updated_at": event.occurred_at, "last_event_seq": seq}
    match event:
        case TaskRequested(data=d):
            await conn.execute(
                insert(tasks)
                .values(
                    id=event.task_id,
                    user_id=event.user_id,
                    model=d.model,
                    task_type=d.task_type,
                    status="PENDING",
                    prompt=d.prompt,
                    input_image_url=d.image_urls[0] if d.image_urls else None,
                    input_image_urls=list(d.image_urls) or None,
                    num_images=d.num_images,
                    aspect_ratio=d.aspect_ratio,
                    guidance_scale=d.guidance_scale,
                    num_inference_steps=d.num_inference_steps,
                    seed=d.seed,
                    safety_tolerance=d.safety_tolerance,
                    strength=d.strength,
                    output_format=d.output_format,
                    created_at=event.occurred_at,
                    **common,
                )
                .on_conflict_do_nothing(index_elements=[tasks.c.id])
            )
        case TaskSubmitted(data=d):
            await conn.execute(
                _task(event).values(
                    request_id=d.request_id, status="IN_QUEUE", queue_position=d.queue_position, **common
                )
            )
        case TaskStatusChanged(data=d):
            await conn.execute(
                _task(event).values(status=d.status, queue_position=d.queue_position, **common)
            )
        case TaskCompleted(data=d):
            images = [img.model_dump() for img in d.images]
            await conn.execute(
                _task(event).values(
                    status="SUCCESS",
                    request_id=d.request_id,
                    image_url=images[0]["url"] if images else None,
                    images=images,
                    seed=d.seed,
                    generation_time=d.generation_time,
                    queue_position=None,
                    completed_at=event.occurred_at,
                    **common,
                )
            )
        case TaskFailed(data=d):
            await conn.execute(
                _task(event).values(
                    status="FAILED", error_message=d.error, completed_at=event.occurred_at, **common
                )
            )
        case TaskCancelled(data=d):
            await conn.execute(
                _task(event).values(
                    status="CANCELLED", error_message=d.reason, completed_at=event.occurred_at, **common
                )
            )
        case ImagesStored(data=d):
            stored = [img.model_dump() for img in d.images]
            row = (
                await conn.execute(
                    update(tasks)
                    .where(tasks.c.id == event.task_id)
                    .values(
                        cloud_image_url=stored[0]["url"], cloud_images=stored, storage_error=None, **common
                    )
                    .returning(tasks.c.user_id, tasks.c.model, tasks.c.prompt, tasks.c.created_at)
                )
            ).first()
            if row is not None:
                await conn.execute(
                    insert(history)
                    .values(
                        source="flux",
                        source_task_id=event.task_id,
                        user_id=row.user_id,
                        model=row.model,
                        prompt=row.prompt,
                        image_url=stored[0]["url"],
                        images=stored,
                        created_at=row.created_at,
                    )
                    .on_conflict_do_nothing(index_elements=[history.c.source, history.c.source_task_id])
                )
        case StorageFailed(data=d):
            await conn.execute(
                update(tasks).where(tasks.c.id == event.task_id).values(storage_error=d.error, **common)
            )
