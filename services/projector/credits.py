"""Folding the configuration and the credit ledgers into ``flux_config``, ``flux_credits`` and
``flux_credit_ledger``.

Pure folds, ``(row or None, seq, event) -> row``: every ledger event carries the state after it
(``balance_after``, ``used_after``), so a user's row is simply the last event's state and a
replay from sequence 1 gives the same balances. ``ConfigChanged`` carries the whole
configuration, so ``flux_config`` (row 1) is the last change. ``apply_side_models`` runs inside
``apply_batch``'s transaction, under the same checkpoint: exactly-once effect here too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import Table
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from schemas.events import (
    ConfigChanged,
    CreditsCharged,
    CreditsGranted,
    CreditsHeld,
    CreditsRefunded,
    FluxEvent,
)
from services.common.db import FluxConfig, FluxCreditLedger, FluxCredits

config_table = cast(Table, FluxConfig.__table__)
credits_table = cast(Table, FluxCredits.__table__)
ledger_table = cast(Table, FluxCreditLedger.__table__)

Row = dict[str, Any]
LEDGER = (CreditsGranted, CreditsHeld, CreditsCharged, CreditsRefunded)


def fold_config(row: Row | None, seq: int, event: ConfigChanged) -> Row:
    d = event.data
    return {
        "id": 1,
        "api_key": d.api_key_encrypted or "",
        "base_url": d.base_url,
        "enabled": d.enabled,
        "timeout": d.timeout,
        "max_concurrent_tasks": d.max_concurrent_tasks,
        "default_model": d.default_model,
        "credit_costs": dict(d.credit_costs),
        "updated_by": event.user_id,
        "created_at": row["created_at"] if row else event.occurred_at,
        "updated_at": event.occurred_at,
    }


def fold_credits(row: Row | None, seq: int, event: FluxEvent) -> Row:
    assert isinstance(event, LEDGER)
    return {
        "user_id": event.user_id,
        "credits_balance": event.data.balance_after,
        "total_used": event.data.used_after,
        "created_at": row["created_at"] if row else event.occurred_at,
        "updated_at": event.occurred_at,
    }


def ledger_entry(seq: int, event: FluxEvent) -> Row:
    assert isinstance(event, LEDGER)
    d = event.data
    return {
        "stream_seq": seq,
        "user_id": event.user_id,
        "kind": event.token,
        "amount": d.amount,
        "balance_after": d.balance_after,
        "task_id": None if isinstance(event, CreditsGranted) else event.task_id,
        "model": event.data.model if isinstance(event, CreditsHeld) else None,
        "reason": event.data.reason if isinstance(event, CreditsGranted) else None,
        "actor": event.data.actor if isinstance(event, CreditsGranted) else None,
        "occurred_at": event.occurred_at,
    }


async def apply_side_models(conn: AsyncConnection, pending: Sequence[tuple[int, FluxEvent]]) -> None:
    """Fold the batch's configuration and ledger events (in stream order) and write the rows."""
    config: Row | None = None
    users: dict[str, Row] = {}
    entries: list[Row] = []
    for seq, event in pending:
        if isinstance(event, ConfigChanged):
            config = fold_config(config, seq, event)
        elif isinstance(event, LEDGER):
            users[event.user_id] = fold_credits(users.get(event.user_id), seq, event)
            entries.append(ledger_entry(seq, event))
    if config is not None:
        upsert = insert(config_table).values(config)
        keep = {k: v for k, v in config.items() if k not in ("id", "created_at")}
        await conn.execute(upsert.on_conflict_do_update(index_elements=[config_table.c.id], set_=keep))
    if users:
        upsert = insert(credits_table)
        await conn.execute(
            upsert.on_conflict_do_update(
                index_elements=[credits_table.c.user_id],
                set_={c: upsert.excluded[c] for c in ("credits_balance", "total_used", "updated_at")},
            ),
            list(users.values()),
        )
    if entries:
        await conn.execute(insert(ledger_table).on_conflict_do_nothing(), entries)
