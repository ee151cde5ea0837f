"""fluxpipe services as separate processes (``fluxpipe run …``), as ``fluxpipe up`` and
compose start them, for tests that need several replicas or servers of their own."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from schemas.events import CreditsCharged, CreditsHeld, CreditsRefunded, decode_event
from services.common import credits
from services.common.auth import issue_token
from services.common.bus import Bus
from services.common.embedded import free_port, wait_for_port
from services.common.settings import Settings
from services.common.supervisor import Supervisor
from services.projector.replay import replay
from tests.conftest import SECRET, migrated_database
from tests.simulator_server import TEST_API_KEY

WORKERS = ("projector", "submitter", "poller", "uploader")
COST = 2  # credits a job costs once ``turn_credits_on`` has run
MODEL = "fal-ai/flux-1/dev"  # what text-to-image runs by default


def service_env(settings: Settings, database_url: str, fal_url: str, storage: Path, **extra: str) -> dict:
    ours = ("NATS_", "DATABASE_", "FAL_", "FLUXPIPE_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    env.update(
        NATS_URL=settings.nats_url,
        DATABASE_URL=database_url,
        FAL_BASE_URL=fal_url,
        FAL_KEY=TEST_API_KEY,
        FLUXPIPE_STREAM=settings.stream_name,
        FLUXPIPE_SUBJECT_PREFIX=settings.subject_prefix,
        FLUXPIPE_STREAM_REPLICAS=str(settings.stream_replicas),
        FLUXPIPE_JWT_SECRET=SECRET,
        FLUXPIPE_IDEMPOTENCY_SECRET=SECRET + "-idempotency",
        FLUXPIPE_STORAGE_DIR=str(storage),
        FLUXPIPE_POLL_MIN="0.1",
        FLUXPIPE_POLL_MAX="0.3",
        FLUXPIPE_FAILOVER_SECONDS="3",
        FLUXPIPE_RATE_JOBS="0",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


@dataclass
class Running:
    urls: list[str]  # the gateways'
    supervisor: Supervisor
    said: list[str]  # what the supervisor reported (restarts)


@contextmanager
def services(env: dict, *, replicas: int = 1, gateways: int = 1) -> Iterator[Running]:
    """``replicas`` of every worker and ``gateways`` gateways, supervised as ``fluxpipe up``
    does (call ``supervisor.check()`` to restart what died)."""
    said: list[str] = []
    children = Supervisor(env, say=said.append)
    ports = [free_port() for _ in range(gateways)]
    try:
        for worker in WORKERS:
            for _ in range(replicas):
                children.spawn(worker)
        procs = [children.spawn("gateway", "--port", str(port)) for port in ports]
        for port, proc in zip(ports, procs, strict=True):
            wait_for_port("127.0.0.1", port, 60, proc)
        yield Running([f"http://127.0.0.1:{port}" for port in ports], children, said)
    finally:
        children.stop()


async def submit(
    http: httpx.AsyncClient, gateways: list[str], prompts: list[str], within: float = 60
) -> list[str]:
    """Submit one text-to-image job per prompt, spread over the gateways; their task ids.

    As a client should: each job with its own ``Idempotency-Key``, retried with it while the
    gateway answers 503 (the event log failing over), so a retry never makes a second task."""
    task_ids = []
    for i, prompt in enumerate(prompts):
        key = uuid.uuid4().hex
        deadline = time.monotonic() + within
        while True:
            try:
                r = await http.post(
                    f"{gateways[i % len(gateways)]}/api/flux/text-to-image",
                    json={"prompt": prompt},
                    headers={"Idempotency-Key": key},
                )
            except httpx.TransportError:  # the gateway is restarting
                assert time.monotonic() < deadline, "the gateway never came back"
                await asyncio.sleep(0.5)
                continue
            if r.status_code != 503 or time.monotonic() > deadline:
                break
            await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
        assert r.status_code == 202, r.text
        task_ids.append(r.json()["task_id"])
    return task_ids


async def wait_all_stored(http: httpx.AsyncClient, gateway: str, task_ids: list[str], within: float) -> None:
    """Until every task is SUCCESS with its stored copy; fails at once on FAILED/CANCELLED."""
    await wait_all_ended(http, gateway, task_ids, within, failures_allowed=False)


async def wait_all_ended(
    http: httpx.AsyncClient,
    gateway: str,
    task_ids: list[str],
    within: float,
    *,
    failures_allowed: bool = True,
) -> dict[str, dict]:
    """Until every task has ended: SUCCESS with its stored copy, or FAILED/CANCELLED (unless
    ``failures_allowed`` is false: then one fails the wait at once). The tasks as last read."""
    deadline = time.monotonic() + within
    ended: dict[str, dict] = {}
    while len(ended) < len(task_ids) and time.monotonic() < deadline:
        for task_id in [t for t in task_ids if t not in ended]:
            try:
                r = await http.get(f"{gateway}/api/flux/task/{task_id}")
            except httpx.TransportError:
                continue
            if r.status_code != 200:
                continue
            task = r.json()
            failed = task["status"] in ("FAILED", "CANCELLED")
            assert failures_allowed or not failed, task
            if failed or (task["status"] == "SUCCESS" and task["cloud_image_url"]):
                ended[task_id] = task
        await asyncio.sleep(0.3)
    assert len(ended) == len(task_ids), f"{len(task_ids) - len(ended)} task(s) never finished"
    return ended


async def assert_each_done_once(bus: Bus, task_ids: list[str]) -> None:
    for task_id in task_ids:
        kinds = Counter(event.token for _, event in await bus.task_story(task_id))
        once = {k: kinds[k] for k in ("requested", "submitted", "completed", "stored")}
        assert set(once.values()) == {1}, (task_id, kinds)


async def projector_caught_up(bus: Bus, settings: Settings, within: float = 120) -> None:
    """Until the projector has applied every message in the stream (its checkpoint)."""
    deadline = time.monotonic() + within
    while True:
        last = (await bus.js.stream_info(bus.stream)).state.last_seq
        conn = await asyncpg.connect(settings.asyncpg_dsn)
        try:
            applied = await conn.fetchval("select coalesce(max(stream_seq), 0) from projector_checkpoints")
        finally:
            await conn.close()
        if applied >= last:
            return
        assert time.monotonic() < deadline, f"the projector stayed at seq {applied} of {last}"
        await asyncio.sleep(0.2)


async def read_models(settings: Settings) -> dict[str, list[dict[str, Any]]]:
    """``flux_tasks`` and ``image_history`` (without its surrogate key), in a stable order."""
    conn = await asyncpg.connect(settings.asyncpg_dsn)
    try:
        return {
            "flux_tasks": [dict(r) for r in await conn.fetch("select * from flux_tasks order by id")],
            "image_history": [
                {k: v for k, v in dict(r).items() if k != "id"}
                for r in await conn.fetch("select * from image_history order by source, source_task_id")
            ],
        }
    finally:
        await conn.close()


async def assert_read_models_equal_a_fresh_replay(bus: Bus, settings: Settings, server_url: str) -> int:
    """Once the projector has caught up, its read models must equal, row for row and column for
    column, what ``fluxpipe replay`` (services/projector/replay.py) builds from the whole log
    into a fresh database on the same server. The number of ``flux_tasks`` rows."""
    await projector_caught_up(bus, settings)
    async with migrated_database(server_url, "fluxpipe_fresh_replay") as fresh_url:
        fresh = settings.model_copy(update={"database_url": fresh_url})
        await replay(fresh, bus)
        live, rebuilt = await read_models(settings), await read_models(fresh)
    for table, rows in live.items():
        replayed = rebuilt[table]
        differing = [(a, b) for a, b in zip(rows, replayed, strict=False) if a != b]
        assert len(rows) == len(replayed) and not differing, (
            f"{table}: {len(rows)} live rows, {len(replayed)} replayed; first differences: {differing[:2]}"
        )
    return len(live["flux_tasks"])


async def keep_alive(children: Supervisor) -> None:
    """What ``fluxpipe up`` does: restart whatever died (an outage may make services exit)."""
    while True:
        children.check()
        await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def kept_alive(children: Supervisor) -> AsyncIterator[None]:
    """``keep_alive`` for the block's duration, and never beyond it: the test session shares one
    event loop, so a keeper left running by a failed test would start its services again, on
    servers that are gone, while the next tests run."""
    keeper = asyncio.create_task(keep_alive(children))
    try:
        yield
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError, RuntimeError):
            await keeper


async def restarted(children: Supervisor, name: str) -> None:
    """Until the supervisor has ``name`` running again."""
    for _ in range(300):
        child = next(c for c in children.children if c.name == name)
        if child.proc is not None and child.proc.poll() is None and child.restart_at is None:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{name} was not restarted")


async def turn_credits_on(
    http: httpx.AsyncClient, gateway: str, settings: Settings, user_id: str, grant: int
) -> None:
    """Through the admin API: every text-to-image job costs ``COST``; ``user_id`` gets ``grant``.
    (The ledger worker must run to settle them: ``supervisor.spawn("ledger")``.)"""
    root = {"Authorization": f"Bearer {issue_token(settings, 'root', admin=True)}"}
    r = await http.put(f"{gateway}/api/flux/admin/config", json={"credit_costs": {MODEL: COST}}, headers=root)
    assert r.status_code == 200, r.text
    r = await http.post(
        f"{gateway}/api/flux/admin/credits/{user_id}", json={"amount": grant, "reason": "test"}, headers=root
    )
    assert r.status_code == 200 and r.json()["balance"] == grant, r.text


async def settled_credits(http: httpx.AsyncClient, gateway: str, within: float = 120) -> dict[str, Any]:
    """Once every task has ended: until the ledger has settled them all (nothing held), the
    caller's ``GET /api/flux/credits``."""
    deadline = time.monotonic() + within
    while True:
        try:
            mine: dict[str, Any] = (await http.get(f"{gateway}/api/flux/credits")).json()
        except httpx.TransportError:
            mine = {"held": None}
        if mine["held"] == 0:
            return mine
        assert time.monotonic() < deadline, f"credits still held: {mine}"
        await asyncio.sleep(0.2)


async def assert_credits_exact(
    bus: Bus,
    settings: Settings,
    user_id: str,
    grant: int,
    succeeded: list[str],
    failed: list[str],
    seen: dict[str, Any],
) -> None:
    """The house rule: a job holds ``COST`` when accepted, is charged when fal completes it and
    refunded when it fails. So the balance is the grant minus ``COST`` per SUCCESS task, nothing
    is held, the user's ledger subject holds one ``held`` and one ``charged`` or ``refunded`` per
    task, and the API's view (``seen``) and the ``flux_credits`` read model agree with it."""
    ledger = await credits.read_ledger(bus, user_id)
    assert ledger.open_tasks == {}, ledger
    assert (ledger.balance, ledger.used) == (grant - COST * len(succeeded), COST * len(succeeded)), ledger
    assert (seen["balance"], seen["held"], seen["total_used"]) == (ledger.balance, 0, ledger.used)
    moves: dict[str, Counter[str]] = {}
    async for _, _, data in bus.iter_raw(credits.ledger_subject(bus, user_id)):
        event = decode_event(data)
        if isinstance(event, CreditsHeld | CreditsCharged | CreditsRefunded):
            moves.setdefault(event.task_id, Counter())[event.token] += 1
    assert moves == {
        **{t: Counter({"held": 1, "charged": 1}) for t in succeeded},
        **{t: Counter({"held": 1, "refunded": 1}) for t in failed},
    }
    await projector_caught_up(bus, settings)
    conn = await asyncpg.connect(settings.asyncpg_dsn)
    try:
        row = await conn.fetchrow(
            "select credits_balance, total_used from flux_credits where user_id = $1", user_id
        )
    finally:
        await conn.close()
    assert row is not None and (row["credits_balance"], row["total_used"]) == (ledger.balance, ledger.used)


def chaos_random() -> random.Random:
    """Where a chaos run strikes: seeded from ``FLUXPIPE_CHAOS_SEED`` or at random, and the seed
    printed, so a failing run can be replayed."""
    seed = int(os.environ.get("FLUXPIPE_CHAOS_SEED", str(random.randrange(1 << 30))))
    print(f"chaos seed {seed} (FLUXPIPE_CHAOS_SEED)")
    return random.Random(seed)
