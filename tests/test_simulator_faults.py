"""The simulator's fault switches, flipped at run time through ``/_simulator/faults`` or set at
start, each ending as fal's failure would, over real HTTP."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request

from services.common.fal import FalClient, FalError
from services.simulator.settings import Faults, SimulatorEnvironment, SimulatorSettings
from tests.simulator_server import TEST_API_KEY, running_simulator, serve

AUTH = {"Authorization": f"Key {TEST_API_KEY}"}
WAIT_LIMIT_SECONDS = 15.0


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorSettings]:
    with running_simulator(queue_seconds=0.05, run_seconds=0.1) as settings:
        yield settings


@pytest.fixture
async def http(sim: SimulatorSettings) -> AsyncIterator[httpx.AsyncClient]:
    """A keyed client; every fault is switched off again after the test."""
    async with httpx.AsyncClient(base_url=sim.public_url, headers=AUTH, timeout=10) as client:
        yield client
        assert (await client.put("/_simulator/faults", json={})).status_code == 200


async def set_faults(http: httpx.AsyncClient, **faults: Any) -> None:
    response = await http.put("/_simulator/faults", json=faults)
    assert response.status_code == 200, response.text


async def submit(http: httpx.AsyncClient, **params: str) -> dict:
    response = await http.post("/fal-ai/flux-1/schnell", json={"prompt": "a kite", "seed": 1}, params=params)
    assert response.status_code == 200, response.text
    return response.json()


async def wait_completed(http: httpx.AsyncClient, status_url: str) -> dict:
    deadline = time.monotonic() + WAIT_LIMIT_SECONDS
    while time.monotonic() < deadline:
        response = await http.get(status_url)
        if response.status_code == 200 and response.json()["status"] == "COMPLETED":
            return response.json()
        await asyncio.sleep(0.02)
    raise AssertionError("request never completed")


async def test_the_control_endpoint_takes_the_simulators_key_and_valid_switches(
    sim: SimulatorSettings, http: httpx.AsyncClient
) -> None:
    async with httpx.AsyncClient(base_url=sim.public_url) as anonymous:
        assert (await anonymous.get("/_simulator/faults")).status_code == 401
        wrong = await anonymous.put("/_simulator/faults", json={}, headers={"Authorization": "Key nope"})
        assert wrong.status_code == 401
    for bad, named in (
        ({"error_rates": {"status": {"503": 1.5}}}, "more than 1"),
        ({"error_rates": {"status": {"200": 0.5}}}, "not an HTTP error status"),
        ({"error_rates": {"upload": {"503": 0.5}}}, "error_rates.upload"),
        ({"burst_429": -1}, "burst_429"),
        ({"slowness": 3}, "slowness"),
    ):
        response = await http.put("/_simulator/faults", json=bad)
        assert response.status_code == 422, bad
        assert named in response.json()["message"], response.json()
    await set_faults(http, burst_429=3, latency_seconds={"result": 0.01})
    shown = (await http.get("/_simulator/faults")).json()
    assert shown["burst_429"] == 3 and shown["latency_seconds"] == {"result": 0.01}


async def test_an_error_rate_answers_that_status_on_that_endpoint_only(http: httpx.AsyncClient) -> None:
    queued = await submit(http)
    await set_faults(http, error_rates={"status": {503: 1.0}})
    status = await http.get(queued["status_url"])
    assert status.status_code == 503
    assert "nginx" in status.text and "x-fal-request-id" not in status.headers
    assert (await submit(http))["status"] == "IN_QUEUE"

    await set_faults(http, error_rates={"submit": {500: 0.5, 429: 0.5}})
    codes = {(await http.post("/fal-ai/flux-1/schnell", json={"prompt": "x"})).status_code for _ in range(30)}
    assert codes <= {500, 429} and codes

    await set_faults(http)
    assert (await http.get(queued["status_url"])).status_code in (200, 202)


async def test_a_429_burst_answers_the_next_n_requests_then_recovers(http: httpx.AsyncClient) -> None:
    await set_faults(http, burst_429=2, retry_after_seconds=3)
    first = await http.post("/fal-ai/flux-1/schnell", json={"prompt": "x"})
    second = await http.get("/fal-ai/flux-1/requests/any/status")
    third = await http.post("/fal-ai/flux-1/schnell", json={"prompt": "x"})
    assert [first.status_code, second.status_code, third.status_code] == [429, 429, 200]
    assert first.headers["retry-after"] == "3"
    assert (await http.get("/_simulator/faults")).json()["burst_429"] == 0


async def test_our_client_rides_out_a_429_burst(sim: SimulatorSettings, http: httpx.AsyncClient) -> None:
    await set_faults(http, burst_429=2, retry_after_seconds=0)
    async with FalClient(
        sim.public_url, TEST_API_KEY, max_attempts=4, backoff_initial=0.001, backoff_max=0.01
    ) as fal:
        handle = await fal.submit("fal-ai/flux-1/schnell", {"prompt": "x"})
    assert handle.request_id


async def test_slow_and_hanging_answers_outlast_a_clients_timeout(http: httpx.AsyncClient) -> None:
    queued = await submit(http)
    await set_faults(http, latency_seconds={"status": 5.0})
    with pytest.raises(httpx.ReadTimeout):
        await http.get(queued["status_url"], timeout=0.3)
    await set_faults(http, latency_seconds={"status": 0.05})
    assert (await http.get(queued["status_url"])).status_code in (200, 202)

    await set_faults(http, hang=["result"])
    with pytest.raises(httpx.ReadTimeout):
        await http.get(queued["response_url"], timeout=0.5)
    assert (await http.get(queued["status_url"])).status_code in (200, 202)


async def test_malformed_json_keeps_the_status_code_but_not_the_body(http: httpx.AsyncClient) -> None:
    queued = await submit(http)
    await wait_completed(http, queued["status_url"])
    await set_faults(http, malformed_json={"result": 1.0})
    result = await http.get(queued["response_url"])
    assert result.status_code == 200 and result.headers["content-type"] == "application/json"
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.content)
    await set_faults(http)
    assert (await http.get(queued["response_url"])).json()["images"]


async def test_a_runner_error_completes_the_request_with_falls_runner_disconnected(
    sim: SimulatorSettings, http: httpx.AsyncClient
) -> None:
    await set_faults(http, runner_error_rate=1.0)
    queued = await submit(http)
    await set_faults(http)
    status = await wait_completed(http, queued["status_url"])
    assert (status["error"], status["error_type"]) == ("Runner disconnected", "runner_disconnected")
    result = await http.get(queued["response_url"])
    assert result.status_code == 503
    assert result.json() == {"detail": "Runner disconnected", "error_type": "runner_disconnected"}
    async with FalClient(sim.public_url, TEST_API_KEY, max_attempts=2, backoff_initial=0.001) as fal:
        with pytest.raises(FalError) as raised:
            await fal.result(queued["response_url"])
    assert raised.value.error_type == "runner_disconnected"


@pytest.fixture(scope="module")
def inbox() -> Iterator[tuple[str, list[str]]]:
    """A webhook receiver recording the request id of each delivery."""
    received: list[str] = []
    app = FastAPI()

    @app.post("/hook")
    async def hook(request: Request) -> dict[str, bool]:
        received.append(json.loads(await request.body())["request_id"])
        return {"ok": True}

    with serve(lambda _: app) as base_url:
        yield base_url + "/hook", received


async def test_a_webhook_delivery_failure_means_it_never_arrives(
    http: httpx.AsyncClient, inbox: tuple[str, list[str]]
) -> None:
    hook_url, received = inbox
    await set_faults(http, webhook_failure_rate=1.0)
    dropped = await submit(http, fal_webhook=hook_url)
    await wait_completed(http, dropped["status_url"])
    await set_faults(http)
    delivered = await submit(http, fal_webhook=hook_url)
    deadline = time.monotonic() + WAIT_LIMIT_SECONDS
    while delivered["request_id"] not in received:
        assert time.monotonic() < deadline, "the healthy webhook never arrived"
        await asyncio.sleep(0.02)
    assert dropped["request_id"] not in received


async def test_benchmark_mode_answers_at_once_with_predrawn_images() -> None:
    with running_simulator(queue_seconds=5, run_seconds=5, benchmark=True) as bench:
        async with httpx.AsyncClient(base_url=bench.public_url, headers=AUTH, timeout=10) as http:
            bodies = []
            for prompt in ("a kite", "a boat"):
                queued = (
                    await http.post("/fal-ai/flux-1/dev", json={"prompt": prompt, "num_images": 2})
                ).json()
                assert (await http.get(queued["status_url"])).json()["status"] == "COMPLETED"
                bodies.append((await http.get(queued["response_url"])).json())
            images = [(await http.get(entry["url"])).content for body in bodies for entry in body["images"]]
    assert all(len(body["images"]) == 2 for body in bodies)
    assert all((e["width"], e["height"]) == (1024, 768) for body in bodies for e in body["images"])
    assert len(set(images)) == 1


def test_faults_and_benchmark_mode_can_be_set_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUXPIPE_SIM_FAULTS", '{"error_rates": {"submit": {"503": 0.25}}, "burst_429": 4}')
    monkeypatch.setenv("FLUXPIPE_SIM_BENCHMARK", "true")
    settings = SimulatorEnvironment().settings("key", "http://127.0.0.1:1")
    assert settings.faults == Faults(error_rates={"submit": {503: 0.25}}, burst_429=4)
    assert settings.benchmark and settings.effective_run_seconds == 0
