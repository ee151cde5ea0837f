"""Two gateway processes on one NATS and PostgreSQL: credits cannot be overspent and rate limits
hold across them (each gateway is ``fluxpipe run gateway``, a real process)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from schemas.events import decode_event
from services.common import credits
from services.common.auth import issue_token
from services.common.bus import Bus
from services.common.config import new_config_key
from services.common.embedded import free_port
from services.common.settings import Settings
from tests.conftest import SECRET
from tests.test_bus import wait_for

pytestmark = pytest.mark.timeout(120)

RATE = 60


@dataclass
class Replicas:
    settings: Settings
    urls: list[str]


@pytest.fixture(scope="module")
def replicas(
    nats_url: str, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Replicas]:
    tag = uuid.uuid4().hex[:10]
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "DATABASE_", "FAL_", "FLUXPIPE_"))
    }
    env.update(
        NATS_URL=nats_url,
        DATABASE_URL=database_url,
        FLUXPIPE_STREAM=f"TEST_{tag}",
        FLUXPIPE_SUBJECT_PREFIX=f"t{tag}",
        FLUXPIPE_JWT_SECRET=SECRET,
        FLUXPIPE_CONFIG_KEY=new_config_key(),
        FLUXPIPE_STORAGE_DIR=str(tmp_path_factory.mktemp("storage")),
        FLUXPIPE_RATE_JOBS=str(RATE),
        FLUXPIPE_RATE_WINDOW=str(10**7),
        FLUXPIPE_LOG_LEVEL="WARNING",
    )
    settings = Settings(
        NATS_URL=nats_url,
        FLUXPIPE_STREAM=env["FLUXPIPE_STREAM"],
        FLUXPIPE_SUBJECT_PREFIX=env["FLUXPIPE_SUBJECT_PREFIX"],
        FLUXPIPE_JWT_SECRET=SECRET,
    )
    procs, urls = [], []
    for _ in range(2):
        port = free_port()
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "services.cli", "run", "gateway", "--port", str(port)],
                env=env,
                cwd=Path(__file__).parent.parent,
            )
        )
        urls.append(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 60
        for proc, url in zip(procs, urls, strict=True):
            while True:
                assert proc.poll() is None, "a gateway exited"
                assert time.monotonic() < deadline, "a gateway never became ready"
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        yield Replicas(settings, urls)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)

        async def cleanup() -> None:
            bus = await Bus.connect(settings, "test", ensure=False)
            with contextlib.suppress(Exception):
                await bus.js.delete_stream(settings.stream_name)
            with contextlib.suppress(Exception):
                await bus.js.delete_key_value(f"{settings.stream_name}_ratelimits")
            await bus.close()

        asyncio.run(cleanup())


def bearer(settings: Settings, user: str, admin: bool = False) -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_token(settings, user, admin=admin)}"}


async def submit_everywhere(urls: list[str], headers: dict[str, str], n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=30) as client:
        return await asyncio.gather(
            *(
                client.post(
                    f"{urls[i % 2]}/api/flux/text-to-image", json={"prompt": f"p{i}"}, headers=headers
                )
                for i in range(n)
            )
        )


async def test_fifty_parallel_jobs_with_credits_for_ten_across_two_gateways(replicas):
    urls = replicas.urls
    root, alice = bearer(replicas.settings, "root", admin=True), bearer(replicas.settings, "alice")
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.put(
            f"{urls[0]}/api/flux/admin/config", json={"credit_costs": {"fal-ai/flux-1/dev": 2}}, headers=root
        )
        assert r.status_code == 200, r.text

        async def both_charge() -> bool:
            seen = [(await client.get(f"{u}/api/flux/credits", headers=alice)).json() for u in urls]
            return all(s["credits_enabled"] for s in seen)

        await wait_for(both_charge)
        r = await client.post(
            f"{urls[1]}/api/flux/admin/credits/alice", json={"amount": 20, "reason": "ten jobs"}, headers=root
        )
        assert r.json()["balance"] == 20

    answers = await submit_everywhere(urls, alice, 50)
    codes = [r.status_code for r in answers]
    assert codes.count(202) == 10 and codes.count(402) == 40, codes
    assert {r.json()["balance"] for r in answers if r.status_code == 402} == {0}

    bus = await Bus.connect(replicas.settings, "test", ensure=False)
    try:
        ledger = [decode_event(d) async for _, _, d in bus.iter_raw(credits.ledger_subject(bus, "alice"))]
        assert all(e.data.balance_after >= 0 for e in ledger)
        assert len([e for e in ledger if e.type == "credits.held"]) == 10
        assert (await credits.read_ledger(bus, "alice")).balance == 0
        accepted = {r.json()["task_id"] for r in answers if r.status_code == 202}
        for task_id in accepted:
            assert await bus.last_event(task_id, "requested") is not None
    finally:
        await bus.close()


async def test_the_job_rate_limit_holds_across_two_gateways(replicas):
    urls = replicas.urls
    answers = await submit_everywhere(urls, bearer(replicas.settings, "bob"), RATE + 10)
    limited = [r for r in answers if r.status_code == 429]
    assert len(limited) == 10, [r.status_code for r in answers]
    assert all(int(r.headers["retry-after"]) >= 1 for r in limited)
    assert all(r.json()["message"].startswith(f"too many jobs: at most {RATE} per") for r in limited)
    other = await submit_everywhere(urls, bearer(replicas.settings, "carol"), 1)
    assert other[0].status_code != 429
