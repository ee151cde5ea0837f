"""Dead letters: list them, show one, re-drive them to the consumer that parked them.

A dead letter is a copy of a message a consumer gave up on, on ``<prefix>.dlq.<durable>``
with headers ``Fluxpipe-Reason``, ``Fluxpipe-Subject`` and ``Fluxpipe-Stream-Seq``
(``Bus.dead_letter``). Letters are never deleted: the log keeps what happened.

Invariants of a re-drive:
- It republishes the letter's event on its original subject, so the durable consumer that
  parked it (whose filter is that subject) gets it again, with the header
  ``Fluxpipe-Redrive-Of: <letter seq>``; the projector and replay skip such copies, so the
  read models never see the event twice.
- A letter is re-driven at most once, ever: the copy's ``Nats-Msg-Id`` is
  ``redrive.<durable>.<letter seq>`` (a retry within the duplicate window is dropped), and
  then a marker is written on ``<prefix>.dlq.redriven.<durable>.<letter seq>`` expecting that
  subject to be empty (``Nats-Expected-Last-Subject-Sequence: 0``): a second re-drive, even
  a concurrent one or one years later, finds the marker and does nothing.
- The consumer handles it like a redelivery: every handler first looks in the log for its
  own outcome and for the task's end, so nothing that already happened is done again (a
  task the dead letter ended stays ended; an upload that failed is attempted again and, if
  it works, the task gets its stored copy).
- Projector letters are not re-driven (the projector follows the log, it has no queue):
  fix the cause, then ``fluxpipe replay``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from nats.js.errors import APIError, NotFoundError

from schemas.events import UnknownEvent, decode_event
from services.common.bus import REDRIVE_OF, Bus

PROJECTOR = "projector"
WRONG_LAST_SEQUENCE = 10071


@dataclass(frozen=True)
class Letter:
    seq: int
    consumer: str
    subject: str
    task_id: str | None
    event_type: str | None
    reason: str
    at: datetime | None
    original_seq: int | None
    redriven_as: int | None
    data: bytes

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("data")
        out["at"] = self.at.isoformat() if self.at else None
        return out


@dataclass(frozen=True)
class Filter:
    consumer: str | None = None
    task_id: str | None = None
    reason: str | None = None  # a glob (``*timeout*``) matched against the reason
    pending_only: bool = False

    def matches(self, letter: Letter) -> bool:
        return (
            (self.consumer is None or letter.consumer == self.consumer)
            and (self.task_id is None or letter.task_id == self.task_id)
            and (self.reason is None or fnmatch.fnmatch(letter.reason, self.reason))
            and not (self.pending_only and letter.redriven_as is not None)
        )


def _task_and_type(bus: Bus, subject: str, data: bytes) -> tuple[str | None, str | None]:
    try:
        event = decode_event(data)
    except UnknownEvent:
        parts = subject.split(".")
        task = parts[2] if len(parts) == 4 and subject.startswith(f"{bus.prefix}.task.") else None
        return task, None
    return event.task_id, str(type(event).model_fields["type"].default)


async def _redrives(bus: Bus) -> dict[tuple[str, int], int]:
    """(consumer, letter seq) → stream seq of its re-driven copy."""
    done: dict[tuple[str, int], int] = {}
    async for _, subject, data in bus.iter_raw(bus.redriven_subject()):
        *_, durable, letter = subject.split(".")
        done[(durable, int(letter))] = int(data or b"0")
    return done


async def letters(bus: Bus, where: Filter | None = None) -> list[Letter]:
    """Every dead letter in stream order (matching ``where``)."""
    where = where or Filter()
    redriven = await _redrives(bus)
    found: list[Letter] = []
    seq = 1
    subject = bus.dlq_subject(where.consumer or "*")
    while True:
        try:
            raw = await bus.js.get_msg(bus.stream, seq=seq, subject=subject, next=True)
        except NotFoundError:
            break
        assert raw.seq is not None and raw.subject is not None
        seq = raw.seq + 1
        headers = raw.headers or {}
        durable = raw.subject.rsplit(".", 1)[-1]
        original_subject = headers.get("Fluxpipe-Subject", "")
        data = raw.data or b""
        task_id, event_type = _task_and_type(bus, original_subject, data)
        original = headers.get("Fluxpipe-Stream-Seq")
        letter = Letter(
            seq=raw.seq,
            consumer=durable,
            subject=original_subject,
            task_id=task_id,
            event_type=event_type,
            reason=headers.get("Fluxpipe-Reason", ""),
            at=raw.time,
            original_seq=int(original) if original and original.isdigit() else None,
            redriven_as=redriven.get((durable, raw.seq)),
            data=data,
        )
        if where.matches(letter):
            found.append(letter)
    return found


async def letter(bus: Bus, seq: int) -> Letter | None:
    try:
        raw = await bus.js.get_msg(bus.stream, seq=seq)
    except NotFoundError:
        return None
    if raw.subject is None or raw.subject.rsplit(".", 1)[0] != f"{bus.prefix}.dlq":
        return None
    durable = raw.subject.rsplit(".", 1)[-1]
    return next((x for x in await letters(bus, Filter(consumer=durable)) if x.seq == seq), None)


@dataclass(frozen=True)
class Redriven:
    letter: int
    consumer: str
    outcome: str  # "redriven", "already redriven", "refused"
    detail: str = ""


async def redrive(bus: Bus, item: Letter) -> Redriven:
    """Put one letter back to its consumer, at most once (see the module's invariants)."""
    if item.consumer == PROJECTOR:
        return Redriven(
            item.seq, item.consumer, "refused", "projector letters: fix the cause, then fluxpipe replay"
        )
    if item.event_type is None:
        return Redriven(
            item.seq, item.consumer, "refused", "the letter is not an event this version can decode"
        )
    if not item.subject.startswith(f"{bus.prefix}.task."):
        return Redriven(item.seq, item.consumer, "refused", "the letter does not name a task event subject")
    marker = bus.redriven_subject(item.consumer, item.seq)
    try:
        await bus.js.get_last_msg(bus.stream, marker)
        return Redriven(item.seq, item.consumer, "already redriven")
    except NotFoundError:
        pass
    copy = await bus.js.publish(
        item.subject,
        item.data,
        stream=bus.stream,
        headers={
            "Nats-Msg-Id": f"redrive.{item.consumer}.{item.seq}",
            REDRIVE_OF: str(item.seq),
            "Fluxpipe-Stream-Seq": str(item.original_seq or ""),
        },
    )
    try:
        await bus.js.publish(
            marker,
            str(copy.seq).encode(),
            stream=bus.stream,
            headers={"Nats-Expected-Last-Subject-Sequence": "0"},
        )
    except APIError as exc:
        if exc.err_code == WRONG_LAST_SEQUENCE:  # a concurrent re-drive won; its copy is ours
            return Redriven(item.seq, item.consumer, "already redriven")
        raise
    return Redriven(item.seq, item.consumer, "redriven", f"as stream seq {copy.seq}")


def render(found: list[Letter]) -> str:
    if not found:
        return "no dead letters"
    lines = [f"{'seq':>8}  {'consumer':<10} {'when':<20} {'task':<34} {'event':<20} {'redriven':<9} reason"]
    for x in found:
        when = x.at.strftime("%Y-%m-%d %H:%M:%S") if x.at else "?"
        lines.append(
            f"{x.seq:>8}  {x.consumer:<10} {when:<20} {(x.task_id or '?'):<34} {(x.event_type or '?'):<20} "
            f"{('#' + str(x.redriven_as)) if x.redriven_as else 'no':<9} {x.reason[:120]}"
        )
    return "\n".join(lines)
