"""Alembic is the only way the schema changes, and it matches the SQLAlchemy models."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
from alembic import command

from services.common.migrate import alembic_config, downgrade, upgrade
from services.common.settings import Settings
from tests.conftest import _with_database


async def test_upgrade_check_downgrade_round_trip(pg_server_url):
    name = f"fluxpipe_mig_{uuid.uuid4().hex[:10]}"
    admin = Settings(DATABASE_URL=pg_server_url).asyncpg_dsn
    conn = await asyncpg.connect(admin)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    settings = Settings(DATABASE_URL=_with_database(pg_server_url, name))
    try:
        await asyncio.to_thread(upgrade, settings)
        await asyncio.to_thread(
            command.check, alembic_config(settings)
        )  # raises if models and database drift apart

        db = await asyncpg.connect(settings.asyncpg_dsn)
        tables = {
            r["tablename"]
            for r in await db.fetch("select tablename from pg_tables where schemaname='public'")
        }
        indexes = {
            r["indexname"]
            for r in await db.fetch("select indexname from pg_indexes where tablename='flux_tasks'")
        }
        await db.close()
        assert {
            "flux_config",
            "flux_tasks",
            "flux_credits",
            "image_history",
            "projector_checkpoints",
        } <= tables
        assert {
            "ix_flux_tasks_user_id",
            "ix_flux_tasks_status",
            "ix_flux_tasks_request_id",
            "ix_flux_tasks_created_at",
        } <= indexes

        await asyncio.to_thread(downgrade, settings)
        db = await asyncpg.connect(settings.asyncpg_dsn)
        left = {
            r["tablename"]
            for r in await db.fetch("select tablename from pg_tables where schemaname='public'")
        }
        await db.close()
        assert left <= {"alembic_version"}
        await asyncio.to_thread(upgrade, settings)
    finally:
        conn = await asyncpg.connect(admin)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()
