"""The per-user credit ledger on JetStream: holds, charges, refunds and grants without overspend.

Each user has one subject, ``<prefix>.credits.<user>``; every movement is an event on it that
carries the ledger state after it (``balance_after``, ``used_after``, ``open_after``: the tasks
holding credits or a slot). The subject's last message *is* the user's ledger, so a writer
reads it, decides, and publishes with ``Nats-Expected-Last-Subject-Sequence`` set to what it
read: two writers racing (two gateway replicas, the ledger worker) cannot both win; the loser
gets "wrong last sequence" and decides again on the new state. No lock service, no overspend,
no negative balance, and a replay of the subject gives the same balances.

Idempotency:
- A hold's msg id is ``credits.<task>.held`` and a task already in ``open_after`` is not held
  again, so a retried submit never holds twice.
- A charge or refund happens only for a task in ``open_after`` and removes it; both share the
  msg id ``credits.<task>.settled``. A redelivered terminal event, or a second ledger worker,
  finds the task gone (or its publish dropped as a duplicate): refunded or charged exactly once.

The same ledger enforces fair share: with ``max_tasks_per_user`` set, a job is admitted only
while fewer than that many of the user's tasks are open (a hold of 0 credits is a slot).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

from nats.js.errors import APIError, NotFoundError

from schemas.events import (
    NO_TASK,
    CreditsCharged,
    CreditsGranted,
    CreditsGrantedData,
    CreditsHeld,
    CreditsHeldData,
    CreditsRefunded,
    CreditsSettledData,
    LedgerEvent,
    TaskRequested,
    decode_event,
    ledger_token,
)
from services.common.bus import Bus

LEDGER_TYPES = (CreditsGranted, CreditsHeld, CreditsCharged, CreditsRefunded)
WRONG_LAST_SEQUENCE = (10071, 10164)  # JSStreamWrongLastSequence(Constant)ErrF
ATTEMPTS = 200


@dataclass(frozen=True)
class Ledger:
    """A user's ledger as of stream sequence ``seq`` (0: no movement yet)."""

    seq: int = 0
    balance: int = 0
    used: int = 0
    open: dict[str, int] | None = None

    @property
    def open_tasks(self) -> dict[str, int]:
        return self.open or {}


class InsufficientCredits(Exception):
    def __init__(self, balance: int, cost: int) -> None:
        super().__init__(f"this job costs {cost} credits and your balance is {balance}")
        self.balance = balance
        self.cost = cost


class TooManyInFlight(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(
            f"you already have {limit} unfinished tasks, the most allowed at once; "
            "submit again when one has finished"
        )
        self.limit = limit


class NegativeBalance(Exception):
    pass


class LedgerBusy(Exception):
    """Too many concurrent writers in a row: the caller should retry later."""


def ledger_subject(bus: Bus, user_id: str) -> str:
    return f"{bus.prefix}.credits.{ledger_token(user_id)}"


async def read_ledger(bus: Bus, user_id: str) -> Ledger:
    try:
        raw = await bus.js.get_last_msg(bus.stream, ledger_subject(bus, user_id))
    except NotFoundError:
        return Ledger()
    event = decode_event(raw.data or b"")
    assert raw.seq is not None and isinstance(event, LEDGER_TYPES)
    d = event.data
    return Ledger(seq=raw.seq, balance=d.balance_after, used=d.used_after, open=dict(d.open_after))


async def _publish_after(bus: Bus, event: LedgerEvent, expected_seq: int) -> int | None:
    """Publish if the user's subject is still at ``expected_seq``: the new stream sequence, or
    None if another writer got there first."""
    try:
        ack = await bus.js.publish(
            event.subject(bus.prefix),
            event.model_dump_json().encode(),
            stream=bus.stream,
            headers={
                "Nats-Msg-Id": event.msg_id,
                "Nats-Expected-Last-Subject-Sequence": str(expected_seq),
            },
        )
    except APIError as exc:
        if exc.err_code in WRONG_LAST_SEQUENCE:
            return None
        raise
    return ack.seq


async def _backoff(attempt: int) -> None:
    await asyncio.sleep(random.uniform(0, min(0.002 * attempt, 0.05)))


async def hold(bus: Bus, request: TaskRequested, cost: int, max_open: int) -> Ledger:
    """Hold ``cost`` credits (and a slot) for the task of ``request``; the ledger after it.

    Raises ``InsufficientCredits`` or ``TooManyInFlight``; a task already holding is left as is.
    """
    for attempt in range(ATTEMPTS):
        ledger = await read_ledger(bus, request.user_id)
        if request.task_id in ledger.open_tasks:
            return ledger
        if max_open and len(ledger.open_tasks) >= max_open:
            raise TooManyInFlight(max_open)
        if ledger.balance < cost:
            raise InsufficientCredits(ledger.balance, cost)
        after = {**ledger.open_tasks, request.task_id: cost}
        event = CreditsHeld(
            task_id=request.task_id,
            user_id=request.user_id,
            data=CreditsHeldData(
                balance_after=ledger.balance - cost,
                used_after=ledger.used,
                open_after=after,
                amount=cost,
                model=request.data.model,
                request=request,
            ),
        )
        if seq := await _publish_after(bus, event, ledger.seq):
            return Ledger(seq, ledger.balance - cost, ledger.used, after)
        await _backoff(attempt)
    raise LedgerBusy(f"the credit ledger of {request.user_id} is too busy")


async def settle(bus: Bus, task_id: str, user_id: str, *, succeeded: bool) -> bool:
    """Charge (success) or refund (failure, cancel) the task's hold once; False if it holds
    nothing (already settled, or submitted while credits were off)."""
    for attempt in range(ATTEMPTS):
        ledger = await read_ledger(bus, user_id)
        if task_id not in ledger.open_tasks:
            return False
        amount = ledger.open_tasks[task_id]
        rest = {k: v for k, v in ledger.open_tasks.items() if k != task_id}
        event: CreditsCharged | CreditsRefunded
        if succeeded:
            data = CreditsSettledData(
                balance_after=ledger.balance, used_after=ledger.used + amount, open_after=rest, amount=amount
            )
            event = CreditsCharged(task_id=task_id, user_id=user_id, data=data)
        else:
            data = CreditsSettledData(
                balance_after=ledger.balance + amount, used_after=ledger.used, open_after=rest, amount=amount
            )
            event = CreditsRefunded(task_id=task_id, user_id=user_id, data=data)
        if await _publish_after(bus, event, ledger.seq):
            return True
        await _backoff(attempt)
    raise LedgerBusy(f"the credit ledger of {user_id} is too busy")


async def grant(bus: Bus, user_id: str, amount: int, reason: str, actor: str) -> Ledger:
    """Add ``amount`` (negative: take back) to the balance, keeping the reason and who did it."""
    for attempt in range(ATTEMPTS):
        ledger = await read_ledger(bus, user_id)
        if ledger.balance + amount < 0:
            raise NegativeBalance(
                f"cannot take {-amount} credits from {user_id}: the balance is {ledger.balance}"
            )
        event = CreditsGranted(
            task_id=NO_TASK,
            user_id=user_id,
            data=CreditsGrantedData(
                balance_after=ledger.balance + amount,
                used_after=ledger.used,
                open_after=ledger.open_tasks,
                amount=amount,
                actor=actor,
                reason=reason,
            ),
        )
        if seq := await _publish_after(bus, event, ledger.seq):
            return Ledger(seq, ledger.balance + amount, ledger.used, ledger.open_tasks)
        await _backoff(attempt)
    raise LedgerBusy(f"the credit ledger of {user_id} is too busy")
