"""Faults during a run (a quick version in CI; ``make chaos`` runs it with 1,050 tasks): every
service killed with SIGKILL in turn, NATS killed and restarted, PostgreSQL stopped and
restarted, each at a random moment while jobs keep arriving, with credits on. Afterwards every
task is SUCCESS, none lost, none done twice, no image stored twice, credits exact (each job
charged once, nothing held), and the read models (``flux_tasks``, ``image_history``) equal what
the real replay builds from the log into a fresh database. Faults of fal and COS:
tests/test_chaos_provider.py."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import httpx
import pytest

from services.common.auth import issue_token
from services.common.bus import Bus
from services.common.embedded import EmbeddedNats, EmbeddedPostgres, free_port
from services.common.migrate import upgrade
from services.common.settings import Settings
from tests.conftest import SECRET
from tests.processes import (
    COST,
    assert_credits_exact,
    assert_each_done_once,
    assert_read_models_equal_a_fresh_replay,
    chaos_random,
    kept_alive,
    restarted,
    service_env,
    services,
    settled_credits,
    submit,
    turn_credits_on,
    wait_all_stored,
)
from tests.simulator_server import running_simulator

ROUNDS = ("projector", "submitter", "poller", "uploader", "gateway", "NATS", "PostgreSQL")
PER_ROUND = int(os.environ.get("FLUXPIPE_CHAOS_PER_ROUND", "6"))
USER = "chaos"

pytestmark = pytest.mark.timeout(420 + PER_ROUND * 20)


async def test_kill_every_service_and_restart_nats_and_postgres_mid_run(tmp_path: Path) -> None:
    nats_port = free_port()
    nats = EmbeddedNats.start(tmp_path / "nats", port=nats_port)
    pg = EmbeddedPostgres.start(tmp_path / "pg")
    settings = Settings(NATS_URL=nats.url, DATABASE_URL=pg.url, FLUXPIPE_JWT_SECRET=SECRET)
    await asyncio.to_thread(upgrade, settings)
    auth = {"Authorization": f"Bearer {issue_token(settings, USER)}"}
    task_ids: list[str] = []
    rng = chaos_random()
    grant = COST * PER_ROUND * len(ROUNDS) + 7
    try:
        with running_simulator(queue_seconds=0.2, run_seconds=0.4) as sim:
            env = service_env(settings, pg.url, sim.public_url, tmp_path / "storage")
            with services(env) as running:
                gateways, children = running.urls, running.supervisor
                children.spawn("ledger")  # settles credits: not one of the test helper's workers
                async with kept_alive(children), httpx.AsyncClient(headers=auth, timeout=30) as http:
                    await turn_credits_on(http, gateways[0], settings, USER, grant)
                    for victim in ROUNDS:
                        prompts = [f"{victim} {i}" for i in range(PER_ROUND)]
                        at = rng.randrange(PER_ROUND + 1)  # a random moment among the round's arrivals
                        task_ids += await submit(http, gateways, prompts[:at])
                        if victim == "NATS":
                            nats.proc.kill()
                            nats.proc.wait()
                            nats = EmbeddedNats.start(tmp_path / "nats", port=nats_port)
                        elif victim == "PostgreSQL":
                            pg.stop()
                            pg = EmbeddedPostgres.start(tmp_path / "pg")
                        else:
                            child = next(c for c in children.children if c.name == victim)
                            assert child.proc is not None
                            os.kill(child.proc.pid, signal.SIGKILL)
                            await restarted(children, victim)
                        task_ids += await submit(http, gateways, prompts[at:])
                    await wait_all_stored(http, gateways[0], task_ids, within=240 + PER_ROUND * 2)
                    mine = await settled_credits(http, gateways[0])
                for victim in ROUNDS[:5]:
                    assert f"fluxpipe: {victim} restarted" in running.said

        bus = await Bus.connect(settings, "test")
        try:
            await assert_each_done_once(bus, task_ids)
            await assert_credits_exact(bus, settings, USER, grant, task_ids, [], mine)
            assert await assert_read_models_equal_a_fresh_replay(bus, settings, pg.url) == len(task_ids)
        finally:
            await bus.close()
        stored = sorted(p.name for p in (tmp_path / "storage").rglob("*") if p.is_file())
        assert len(stored) == len(task_ids), "an image was stored twice or not at all"
    finally:
        nats.stop()
        pg.stop()
