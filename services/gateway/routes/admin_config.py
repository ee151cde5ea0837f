"""``/api/flux/admin``: the configuration and credit grants, for admins only.

A configuration change is published as ``ConfigChanged`` (the whole configuration, the fal key
as ciphertext only) with ``Nats-Expected-Last-Subject-Sequence``, so two admins saving at once
never lose one's change; every service applies it within seconds (services/common/config.py).
``GET`` answers from the ``flux_config`` read model. The key is never returned, only masked.
"""

from __future__ import annotations

from typing import Annotated, Any, cast

from fastapi import APIRouter, Depends, HTTPException, Request, status
from nats.js.errors import APIError
from sqlalchemy import Table, select

from schemas.admin_api import ConfigOut, ConfigUpdate, CreditGrant, CreditsOut
from schemas.events import NO_TASK, ConfigChanged, ConfigChangedData, encode_event
from services.common import credits
from services.common.auth import Principal
from services.common.bus import Bus
from services.common.config import (
    ConfigKeyError,
    config_subject,
    decrypt_key,
    encrypt_key,
    from_settings,
    mask_key,
    read_current,
)
from services.common.db import FluxConfig
from services.common.settings import Settings
from services.gateway.admission import Refused
from services.gateway.deps import BusDep, CurrentUser, EngineDep, SettingsDep
from services.gateway.routes.credits import credits_of

router = APIRouter(prefix="/api/flux/admin", tags=["admin"])

config_table = cast(Table, FluxConfig.__table__)


async def require_admin(user: CurrentUser) -> Principal:
    if not user.admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this route is for administrators only")
    return user


AdminUser = Annotated[Principal, Depends(require_admin)]


def _out(settings: Settings, data: ConfigChangedData, by: str | None, at: Any) -> ConfigOut:
    try:
        key = decrypt_key(settings, data.api_key_encrypted) if data.api_key_encrypted else None
    except ConfigKeyError as exc:
        raise Refused(status.HTTP_500_INTERNAL_SERVER_ERROR, str(exc)) from exc
    shown = mask_key(key if key is not None else settings.fal_key.get_secret_value())
    return ConfigOut(
        **data.model_dump(include={"base_url", "enabled", "timeout", "max_concurrent_tasks"}),
        default_model=data.default_model,
        credit_costs=data.credit_costs,
        api_key=shown,
        api_key_source="config" if key is not None else "environment",
        updated_by=by,
        updated_at=at,
    )


@router.get("/config", response_model=ConfigOut)
async def get_config(admin: AdminUser, engine: EngineDep, settings: SettingsDep) -> ConfigOut:
    """The provider configuration (the fal key masked)."""
    async with engine.connect() as conn:
        row = (await conn.execute(select(config_table).where(config_table.c.id == 1))).first()
    if row is None:
        return _out(settings, from_settings(settings), None, None)
    data = ConfigChangedData(
        base_url=row.base_url,
        enabled=row.enabled,
        timeout=row.timeout,
        max_concurrent_tasks=row.max_concurrent_tasks,
        default_model=row.default_model,
        credit_costs=row.credit_costs,
        api_key_encrypted=row.api_key or None,
    )
    return _out(settings, data, row.updated_by, row.updated_at)


@router.put("/config", response_model=ConfigOut)
async def put_config(
    body: ConfigUpdate, admin: AdminUser, bus: BusDep, settings: SettingsDep, request: Request
) -> ConfigOut:
    """Change the configuration; every service applies it within seconds, without a restart."""
    given = body.model_dump(exclude_unset=True, exclude={"api_key"})
    if "base_url" in given:
        given["base_url"] = str(body.base_url).rstrip("/")
    for _ in range(20):
        seq, current = await read_current(bus)
        base = current or from_settings(settings)
        update: dict[str, Any] = dict(given)
        changed = [k for k, v in given.items() if getattr(base, k) != v]
        if body.api_key is not None:
            try:
                update["api_key_encrypted"] = encrypt_key(settings, body.api_key)
            except ConfigKeyError as exc:
                raise Refused(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from exc
            changed.append("api_key")
        data = base.model_copy(update={**update, "changed": tuple(changed)})
        event = ConfigChanged(task_id=NO_TASK, user_id=admin.user_id, data=data)
        if new_seq := await _publish_config(bus, event, seq):
            await request.app.state.live_config.apply(new_seq, data)  # this process: at once
            return _out(settings, data, admin.user_id, event.occurred_at)
    raise Refused(status.HTTP_409_CONFLICT, "the configuration keeps changing under us; try again")


async def _publish_config(bus: Bus, event: ConfigChanged, expected_seq: int) -> int | None:
    try:
        ack = await bus.js.publish(
            config_subject(bus.prefix),
            encode_event(event),
            stream=bus.stream,
            headers={"Nats-Msg-Id": event.msg_id, "Nats-Expected-Last-Subject-Sequence": str(expected_seq)},
        )
    except APIError as exc:
        if exc.err_code in credits.WRONG_LAST_SEQUENCE:
            return None
        raise
    return ack.seq


@router.post("/credits/{user_id}", response_model=CreditsOut)
async def grant_credits(
    user_id: str, body: CreditGrant, admin: AdminUser, bus: BusDep, engine: EngineDep
) -> CreditsOut:
    """Grant (or, with a negative amount, take back) credits; the reason is kept in the ledger."""
    if len(user_id) > 255 or not user_id.isprintable():
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, "user_id: at most 255 printable characters"
        )
    try:
        await credits.grant(bus, user_id, body.amount, body.reason, actor=admin.user_id)
    except credits.NegativeBalance as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    except credits.LedgerBusy as exc:
        raise Refused(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc), headers={"Retry-After": "1"}) from exc
    return await credits_of(user_id, bus, engine, None)
