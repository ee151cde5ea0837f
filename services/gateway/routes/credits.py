"""``GET /api/flux/credits``: the caller's balance (read from their ledger subject, so it is
exact at once) and their movements (from the ``flux_credit_ledger`` read model)."""

from __future__ import annotations

from typing import Annotated, cast

from fastapi import APIRouter, Query, Request
from sqlalchemy import Table, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from schemas.admin_api import CreditsOut, LedgerEntry
from services.common import credits
from services.common.bus import Bus
from services.common.config import LiveConfig
from services.common.db import FluxCreditLedger
from services.gateway.deps import BusDep, CurrentUser, EngineDep

router = APIRouter(prefix="/api/flux", tags=["credits"])

ledger_table = cast(Table, FluxCreditLedger.__table__)


async def credits_of(
    user_id: str, bus: Bus, engine: AsyncEngine, live: LiveConfig | None, page: int = 1, limit: int = 50
) -> CreditsOut:
    ledger = await credits.read_ledger(bus, user_id)
    mine = ledger_table.c.user_id == user_id
    async with engine.connect() as conn:
        total = (await conn.execute(select(func.count()).select_from(ledger_table).where(mine))).scalar_one()
        rows = (
            await conn.execute(
                select(ledger_table)
                .where(mine)
                .order_by(ledger_table.c.stream_seq.desc())
                .limit(limit)
                .offset((page - 1) * limit)
            )
        ).all()
    return CreditsOut(
        user_id=user_id,
        balance=ledger.balance,
        held=sum(ledger.open_tasks.values()),
        total_used=ledger.used,
        credits_enabled=live.credits_on if live else False,
        costs=dict(live.credit_costs) if live else {},
        ledger=[LedgerEntry.model_validate(r, from_attributes=True) for r in rows],
        ledger_total=total,
        page=page,
        limit=limit,
    )


@router.get("/credits", response_model=CreditsOut)
async def my_credits(
    user: CurrentUser,
    bus: BusDep,
    engine: EngineDep,
    request: Request,
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> CreditsOut:
    """The caller's credit balance, held credits, what each model costs, and their ledger."""
    live: LiveConfig = request.app.state.live_config
    return await credits_of(user.user_id, bus, engine, live, page, limit)
