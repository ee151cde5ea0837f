"""Scale-out without containers: two replicas of every worker and two gateways, as separate
processes (``fluxpipe run …``, exactly as ``fluxpipe up`` and compose start them), against one
NATS and one PostgreSQL. Every task is done once: one submit to fal, one completion, one stored
copy, one row, whichever replica took which step."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.common.auth import issue_token
from services.common.embedded import free_port, wait_for_port
from services.common.settings import Settings
from services.common.supervisor import Supervisor
from tests.conftest import SECRET
from tests.simulator_server import TEST_API_KEY, running_simulator

pytestmark = pytest.mark.timeout(240)

TASKS = 24


@pytest.fixture
def replicas(settings: Settings, database_url: str, tmp_path: Path, engine) -> Iterator[list[str]]:
    """Two gateways and two of each worker; yields the gateways' URLs."""
    with running_simulator(queue_seconds=0.2, run_seconds=0.3) as sim:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("NATS_", "DATABASE_", "FAL_", "FLUXPIPE_"))
        }
        env.update(
            NATS_URL=settings.nats_url,
            DATABASE_URL=database_url,
            FAL_BASE_URL=sim.public_url,
            FAL_KEY=TEST_API_KEY,
            FLUXPIPE_STREAM=settings.stream_name,
            FLUXPIPE_SUBJECT_PREFIX=settings.subject_prefix,
            FLUXPIPE_JWT_SECRET=SECRET,
            FLUXPIPE_STORAGE_DIR=str(tmp_path / "storage"),
            FLUXPIPE_POLL_MIN="0.1",
            FLUXPIPE_POLL_MAX="0.3",
            FLUXPIPE_FAILOVER_SECONDS="3",
            PYTHONUNBUFFERED="1",
        )
        children = Supervisor(env, say=lambda line: None)
        ports = [free_port(), free_port()]
        try:
            for worker in ("projector", "submitter", "poller", "uploader"):
                children.spawn(worker)
                children.spawn(worker)
            gateways = [children.spawn("gateway", "--port", str(port)) for port in ports]
            for port, proc in zip(ports, gateways, strict=True):
                wait_for_port("127.0.0.1", port, 60, proc)
            yield [f"http://127.0.0.1:{port}" for port in ports]
        finally:
            children.stop()


async def test_two_replicas_of_everything_do_every_task_once(replicas, settings, bus) -> None:
    auth = {"Authorization": f"Bearer {issue_token(settings, 'scaler')}"}
    http = httpx.AsyncClient(headers=auth, timeout=10)
    task_ids = []
    for i in range(TASKS):
        gateway = replicas[i % 2]
        r = await http.post(f"{gateway}/api/flux/text-to-image", json={"prompt": f"replica {i}", "seed": i})
        assert r.status_code == 202, r.text
        task_ids.append(r.json()["task_id"])

    deadline = time.monotonic() + 150
    pending = set(task_ids)
    while pending and time.monotonic() < deadline:
        for task_id in list(pending):
            task = (await http.get(f"{replicas[0]}/api/flux/task/{task_id}")).json()
            if task["status"] == "SUCCESS" and task["cloud_image_url"]:
                pending.discard(task_id)
            assert task["status"] not in ("FAILED", "CANCELLED"), task
        await asyncio.sleep(0.3)
    assert not pending, f"{len(pending)} task(s) never finished"

    for task_id in task_ids:
        kinds = Counter(event.token for _, event in await bus.task_story(task_id))
        assert kinds["requested"] == kinds["submitted"] == kinds["completed"] == kinds["stored"] == 1, (
            task_id,
            kinds,
        )
    history = (await http.get(f"{replicas[1]}/api/flux/history?limit=100")).json()
    await http.aclose()
    assert history["total"] == TASKS
    request_ids = {item["request_id"] for item in history["items"]}
    assert len(request_ids) == TASKS  # one fal job per task
