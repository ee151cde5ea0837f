"""Scale-out without containers: two replicas of every worker and two gateways, as separate
processes (``fluxpipe run …``, exactly as ``fluxpipe up`` and compose start them), against one
NATS and one PostgreSQL. Every task is done once: one submit to fal, one completion, one stored
copy, one row, whichever replica took which step."""

from __future__ import annotations

import httpx
import pytest

from services.common.auth import issue_token
from tests.processes import assert_each_done_once, service_env, services, submit, wait_all_stored
from tests.simulator_server import running_simulator

pytestmark = pytest.mark.timeout(240)

TASKS = 24


async def test_two_replicas_of_everything_do_every_task_once(settings, database_url, engine, bus, tmp_path):
    with (
        running_simulator(queue_seconds=0.2, run_seconds=0.3) as sim,
        services(
            service_env(settings, database_url, sim.public_url, tmp_path), replicas=2, gateways=2
        ) as running,
    ):
        gws = running.urls
        auth = {"Authorization": f"Bearer {issue_token(settings, 'scaler')}"}
        async with httpx.AsyncClient(headers=auth, timeout=10) as http:
            task_ids = await submit(http, gws, [f"replica {i}" for i in range(TASKS)])
            await wait_all_stored(http, gws[0], task_ids, within=150)
            await assert_each_done_once(bus, task_ids)
            history = (await http.get(f"{gws[1]}/api/flux/history?limit=100")).json()
    assert history["total"] == TASKS
    assert len({item["request_id"] for item in history["items"]}) == TASKS  # one fal job per task
