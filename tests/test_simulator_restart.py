"""A simulator with a data folder survives a restart as fal does: requests in flight finish,
finished ones keep their results and files, cancellations hold, owed webhooks are delivered and
still verify against the same key."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
from fastapi import FastAPI, Request

from services.common.embedded import free_port
from tests.simulator_server import TEST_API_KEY, running_simulator, serve

AUTH = {"Authorization": f"Key {TEST_API_KEY}"}
WAIT_LIMIT_SECONDS = 15.0


async def wait_for(http: httpx.AsyncClient, status_url: str, phase: str) -> dict:
    deadline = time.monotonic() + WAIT_LIMIT_SECONDS
    while time.monotonic() < deadline:
        body = (await http.get(status_url)).json()
        if body["status"] == phase:
            return body
        await asyncio.sleep(0.02)
    raise AssertionError(f"request never reached {phase}")


async def test_requests_in_flight_finish_after_a_restart_on_the_same_folder(tmp_path: Path) -> None:
    port = free_port()
    received: list[dict] = []
    hooks = FastAPI()

    @hooks.post("/hook")
    async def hook(request: Request) -> dict[str, bool]:
        received.append(json.loads(await request.body()))
        return {"ok": True}

    timings = {"queue_seconds": 0.0, "run_seconds": 1.0, "data_dir": tmp_path}
    with serve(lambda _: hooks) as hook_base:
        with running_simulator(port=port, **timings) as before:
            async with httpx.AsyncClient(base_url=before.public_url, headers=AUTH, timeout=10) as http:
                done = (await http.post("/fal-ai/flux-1/schnell", json={"prompt": "done", "seed": 4})).json()
                await wait_for(http, done["status_url"], "COMPLETED")
                done_result = (await http.get(done["response_url"])).json()
                in_flight = (
                    await http.post(
                        "/fal-ai/flux-1/dev",
                        json={"prompt": "in flight", "seed": 9, "num_images": 2},
                        params={"fal_webhook": hook_base + "/hook"},
                    )
                ).json()
                await wait_for(http, in_flight["status_url"], "IN_PROGRESS")
                parked = (
                    await http.post("/fal-ai/flux-pro/kontext/text-to-image", json={"prompt": "x"})
                ).json()
                assert (await http.put(parked["cancel_url"])).status_code == 202
                jwks = (await http.get("/.well-known/jwks.json")).json()
            assert not received

        with running_simulator(port=port, **timings) as after:
            assert after.public_url == before.public_url
            async with httpx.AsyncClient(base_url=after.public_url, headers=AUTH, timeout=10) as http:
                status = await wait_for(http, in_flight["status_url"], "COMPLETED")
                result = await http.get(in_flight["response_url"])
                again = await http.get(done["response_url"])
                cancelled = await wait_for(http, parked["status_url"], "COMPLETED")
                files = [await http.get(entry["url"]) for entry in result.json()["images"]]
                files += [await http.get(done_result["images"][0]["url"])]
                assert (await http.get("/.well-known/jwks.json")).json() == jwks
                deadline = time.monotonic() + WAIT_LIMIT_SECONDS
                while not received:
                    assert time.monotonic() < deadline, "the webhook owed before the restart never came"
                    await asyncio.sleep(0.02)

    assert "error" not in status
    assert result.status_code == 200 and len(result.json()["images"]) == 2
    assert result.json()["seed"] == 9
    assert again.json() == done_result
    assert cancelled["error_type"] == "request_cancelled"
    assert all(f.status_code == 200 and f.headers["content-type"] == "image/jpeg" for f in files)
    [delivered] = received
    assert (delivered["request_id"], delivered["status"]) == (in_flight["request_id"], "OK")
    assert delivered["payload"] == result.json()
