"""A task read straight from the event log, for when the read model cannot answer.

Used when a task was accepted moments ago and is not projected yet, and when PostgreSQL is
down: the task's story is folded with the projector's own pure ``fold_task``, so the answer
is exactly what the read model will say once it catches up. Ownership is checked on the
folded row (another user's task is "not found", never shown).
"""

from __future__ import annotations

from services.common.auth import Principal
from services.common.bus import Bus
from services.projector.projection import Row, fold_task


async def task_from_log(bus: Bus, task_id: str, user: Principal) -> Row | None:
    """The task's row as its events make it, if it exists and ``user`` may see it."""
    if not task_id.isalnum():
        return None  # never a subject wildcard or token separator
    row: Row | None = None
    for seq, event in await bus.task_story(task_id):
        row = fold_task(row, seq, event)
    if row is None or not (user.admin or row["user_id"] == user.user_id):
        return None
    return row
