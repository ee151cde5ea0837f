"""Fair share on the real pipeline: one user flooding the gateway gets at most their in-flight cap
of tasks into the queue, so another user's jobs still go through and finish, and the flooder's
slots come back as their tasks end (gateway in-process; submitter, poller and ledger workers on
real NATS; the fal simulator over HTTP)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from schemas.events import CreditsHeld, decode_event
from services.common import credits
from services.common.auth import issue_token
from services.gateway.app import create_app
from services.ledger.main import worker as ledger_worker
from services.poller.main import worker as poller_worker
from services.simulator.app import SimulatorSettings
from services.submitter.main import worker as submitter_worker
from tests.simulator_server import TEST_API_KEY, running_simulator
from tests.test_bus import wait_for

CAP = 2


@pytest.fixture(scope="module")
def steady() -> Iterator[SimulatorSettings]:
    """A simulator whose jobs run for seconds: the flooder's tasks stay in flight during the flood."""
    with running_simulator(queue_seconds=0.1, run_seconds=3) as sim:
        yield sim


@pytest.fixture
async def pipeline(settings, engine, bus, steady) -> AsyncIterator[httpx.AsyncClient]:
    """Three slots at fal for everyone; each user may have two tasks unfinished."""
    settings.max_tasks_per_user = CAP
    settings.max_concurrent_tasks = CAP + 1
    settings.fal_base_url = steady.public_url
    settings.fal_key = type(settings.fal_key)(TEST_API_KEY)
    stop = asyncio.Event()
    workers = [
        asyncio.create_task(w.main(settings.model_copy(), stop))
        for w in (submitter_worker, poller_worker, ledger_worker)
    ]
    app = create_app(settings)
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
                yield client
    finally:
        stop.set()
        await asyncio.gather(*workers)


async def test_a_flooding_user_does_not_make_another_wait(pipeline, settings, bus):
    flooder = {"Authorization": f"Bearer {issue_token(settings, 'flooder')}"}
    other = {"Authorization": f"Bearer {issue_token(settings, 'other')}"}
    body = {"prompt": "a wave", "model": "fal-ai/flux-1/schnell", "num_inference_steps": 2}

    flood = await asyncio.gather(
        *(pipeline.post("/api/flux/text-to-image", json=body, headers=flooder) for _ in range(30))
    )
    codes = [r.status_code for r in flood]
    assert codes.count(202) == CAP and codes.count(429) == 30 - CAP
    mine = [(await pipeline.post("/api/flux/text-to-image", json=body, headers=other)) for _ in range(CAP)]
    assert [r.status_code for r in mine] == [202] * CAP

    async def ended(task_ids: list[str]) -> bool:
        return all([await bus.last_event(t, "completed") is not None for t in task_ids])

    await wait_for(lambda: ended([r.json()["task_id"] for r in mine]), timeout=30)
    await wait_for(lambda: ended([r.json()["task_id"] for r in flood if r.status_code == 202]), timeout=30)

    async def slot_is_back() -> bool:
        r = await pipeline.post("/api/flux/text-to-image", json=body, headers=flooder)
        return r.status_code == 202

    await wait_for(slot_is_back)
    subject = credits.ledger_subject(bus, "flooder")
    ledger = [decode_event(d) async for _, _, d in bus.iter_raw(subject)]
    assert all(len(e.data.open_after) <= CAP for e in ledger)
    assert len([e for e in ledger if isinstance(e, CreditsHeld)]) == CAP + 1
