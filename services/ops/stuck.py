"""``fluxpipe stuck``: tasks not terminal past their timeout, and where each one is stuck.

The candidates come from the read model (``flux_tasks``: status not SUCCESS/FAILED/CANCELLED,
created longer ago than the timeout); where each is stuck comes from the log, which is the
truth: its last event, whether it ended in the log but not in the read model (projector
behind or parked it), whether a consumer dead-lettered it, and otherwise which consumer
holds it: a message past the consumer's delivered position is waiting for it, one between
its ack floor and its delivered position is in a worker's hands. Read-only.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from nats.js.errors import NotFoundError

from schemas.events import TERMINAL_TOKENS, UnknownEvent, decode_event
from services.common.bus import Bus
from services.common.settings import Settings
from services.ops.dlq import letters

HOLDERS = {"requested": "submitter", "submitted": "poller", "status": "poller", "completed": "uploader"}


@dataclass(frozen=True)
class StuckTask:
    task_id: str
    user_id: str
    status: str
    model: str
    age_seconds: float
    last_event: str | None
    last_event_seq: int | None
    last_event_at: datetime | None
    where: str

    def summary(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["last_event_at"] = self.last_event_at.isoformat() if self.last_event_at else None
        return out


async def _holder(bus: Bus, durable: str, seq: int) -> str:
    try:
        info = await bus.js.consumer_info(bus.stream, durable)
    except NotFoundError:
        return f"waiting for the {durable}, whose consumer does not exist: has it ever started?"
    delivered = info.delivered.stream_seq or 0
    floor = info.ack_floor.stream_seq or 0
    if seq > delivered:
        return f"waiting in the {durable}'s queue ({info.num_pending} message(s) not delivered yet)"
    if seq > floor:
        return f"in the {durable}'s hands (delivered, not acked; {info.num_ack_pending} in hand in all)"
    return f"the {durable} finished with it, yet no next event followed: look at its log"


async def _where(
    bus: Bus, task_id: str, dead: dict[str, list[str]]
) -> tuple[str, tuple[str, int, datetime] | None]:
    story: list[tuple[int, str, datetime]] = []
    async for seq, _, data in bus.iter_raw(bus.task_subject(task_id)):
        try:
            event = decode_event(data)
        except UnknownEvent:
            continue
        story.append((seq, event.token, event.occurred_at))
    if not story:
        return "no events in the log: the read model has a task the log does not (wrong stream?)", None
    seq, token, at = story[-1]
    last = (token, seq, at)
    ended = [s for s in story if s[1] in TERMINAL_TOKENS]
    if ended:
        return (
            f"ended in the log ({ended[0][1]} at seq {ended[0][0]}) but not in the read model: "
            "is the projector behind, or did it park the event?",
            last,
        )
    if task_id in dead:
        return "dead-lettered by " + "; ".join(
            dead[task_id]
        ) + " (fluxpipe dlq list --task " + task_id + ")", last
    holder = HOLDERS.get(token)
    if holder is None:
        return f"last event {token}: nothing consumes it", last
    anchor = next(
        (s for s, t, _ in reversed(story) if t == ("submitted" if token == "status" else token)), seq
    )
    return await _holder(bus, holder, anchor), last


async def stuck_tasks(
    settings: Settings, bus: Bus, older_than: float | None = None, limit: int = 100
) -> list[StuckTask]:
    """Tasks not terminal ``older_than`` seconds after creation (default: the task timeout)."""
    age = older_than if older_than is not None else settings.task_timeout_seconds
    conn = await asyncpg.connect(settings.asyncpg_dsn)
    try:
        rows = await conn.fetch(
            "select id, user_id, status, model, created_at from flux_tasks "
            "where status not in ('SUCCESS', 'FAILED', 'CANCELLED') and created_at < $1 "
            "order by created_at limit $2",
            datetime.now(UTC) - timedelta(seconds=age),
            limit,
        )
    finally:
        await conn.close()
    if not rows:
        return []
    dead: dict[str, list[str]] = {}
    for item in await letters(bus):
        if item.task_id and item.redriven_as is None:
            dead.setdefault(item.task_id, []).append(f"{item.consumer}: {item.reason[:200]}")
    found = []
    now = datetime.now(UTC)
    for row in rows:
        where, last = await _where(bus, row["id"], dead)
        found.append(
            StuckTask(
                task_id=row["id"],
                user_id=row["user_id"],
                status=row["status"],
                model=row["model"],
                age_seconds=(now - row["created_at"]).total_seconds(),
                last_event=last[0] if last else None,
                last_event_seq=last[1] if last else None,
                last_event_at=last[2] if last else None,
                where=where,
            )
        )
    return found


def render(found: list[StuckTask], older_than: float) -> str:
    if not found:
        return f"no task is unfinished {older_than:g}s after it was created"
    lines = [f"{len(found)} task(s) unfinished {older_than:g}s after creation:"]
    for t in found:
        lines.append(
            f"{t.task_id}  {t.status:<11} {t.age_seconds:>8.0f}s old  {t.model}  user={t.user_id}\n"
            f"    last event: {t.last_event or '-'} (seq {t.last_event_seq or '-'})\n    where: {t.where}"
        )
    return "\n".join(lines)
