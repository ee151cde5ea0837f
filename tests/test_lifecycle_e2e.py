"""Cancel, retry and fal's webhooks through the whole stack (``fluxpipe up``), over HTTP.

The provider is the fal simulator on a real socket in this process, behind a door that records
what was submitted to it; its JWKS (as the gateway fetches it) also carries a key of the test's
own, so the tests can sign deliveries the way fal does.
The stack runs one task at fal at a time, gets fal's webhooks at its gateway, and also polls
quickly, so webhooks and polling race on every task.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.embedded import free_port
from services.simulator.app import SimulatorSettings, create_app
from tests.simulator_server import serve
from tests.test_e2e import FAL_KEY, Stack, follow

pytestmark = pytest.mark.timeout(300)


class Fal:
    """The simulator as the tests see it from outside: what was submitted to it (recorded at its
    door), its answers over HTTP, and a JWKS that also holds a key of ours, so the tests can
    sign deliveries as fal would (the gateway accepts any key of the JWKS, as fal documents)."""

    def __init__(self, url: str, jwks_url: str, key: Ed25519PrivateKey, prompts: list[str]) -> None:
        self.url, self.jwks_url, self.key, self.prompts = url, jwks_url, key, prompts

    def submitted(self, prompt: str) -> int:
        return self.prompts.count(prompt)

    def status(self, request_id: str) -> dict:
        url = f"{self.url}/fal-ai/flux-1/requests/{request_id}/status"
        return httpx.get(url, headers={"Authorization": f"Key {FAL_KEY}"}).json()

    def sign(
        self, body: bytes, request_id: str, *, at: float | None = None, key: Ed25519PrivateKey | None = None
    ) -> dict[str, str]:
        ts = str(int(time.time() if at is None else at))
        message = "\n".join([request_id, "fal-user", ts, hashlib.sha256(body).hexdigest()]).encode()
        return {
            "Content-Type": "application/json",
            "X-Fal-Webhook-Request-Id": request_id,
            "X-Fal-Webhook-User-Id": "fal-user",
            "X-Fal-Webhook-Timestamp": ts,
            "X-Fal-Webhook-Signature": (key or self.key).sign(message).hex(),
        }


def recording_submits(app: ASGIApp, prompts: list[str]) -> ASGIApp:
    """``app`` behind a door that notes the prompt of every submit (POST) it lets through."""

    async def door(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await app(scope, receive, send)
            return
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        raw = b"".join(chunks)
        with contextlib.suppress(ValueError, AttributeError):
            prompts.append(json.loads(raw).get("prompt"))

        async def replay() -> Message:
            return {"type": "http.request", "body": raw, "more_body": False}

        await app(scope, replay, send)

    return door


@pytest.fixture(scope="module")
def fal() -> Iterator[Fal]:
    prompts: list[str] = []
    ours = Ed25519PrivateKey.generate()

    def build_simulator(base_url: str) -> ASGIApp:
        settings = SimulatorSettings(api_key=FAL_KEY, public_url=base_url, queue_seconds=0.3, run_seconds=3.0)
        return recording_submits(create_app(settings), prompts)

    with serve(build_simulator) as sim_url:

        def build_jwks(_: str) -> ASGIApp:
            app = FastAPI()

            @app.get("/.well-known/jwks.json")
            async def jwks() -> dict[str, Any]:
                async with httpx.AsyncClient() as http:
                    theirs = (await http.get(f"{sim_url}/.well-known/jwks.json")).json()["keys"]
                raw = ours.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
                x = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
                return {"keys": [*theirs, {"kty": "OKP", "crv": "Ed25519", "x": x}]}

            return app

        with serve(build_jwks) as jwks_base:
            yield Fal(sim_url, f"{jwks_base}/.well-known/jwks.json", ours, prompts)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, fal: Fal) -> Iterator[Stack]:
    port = free_port()
    stack = Stack(
        tmp_path_factory.mktemp("lifecycle-data"),
        port=port,
        extra_env={
            "FAL_BASE_URL": fal.url,
            "FAL_JWKS_URL": fal.jwks_url,
            "FLUXPIPE_WEBHOOK_BASE_URL": f"http://127.0.0.1:{port}",
            "FLUXPIPE_MAX_CONCURRENT_TASKS": "1",
            "FLUXPIPE_POLL_MAX": "0.3",
        },
    )
    yield stack
    if stack.proc.poll() is None:
        stack.stop()


@pytest.fixture
def client(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, headers=stack.auth, timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
def finished(stack: Stack) -> dict:
    """One task that ran to SUCCESS."""
    with httpx.Client(base_url=stack.url, headers=stack.auth, timeout=10) as client:
        r = client.post("/api/flux/text-to-image", json={"prompt": f"done {uuid.uuid4().hex}", "seed": 7})
        task, _ = follow(client, r.json()["task_id"], {"SUCCESS", "FAILED", "CANCELLED"})
    assert task["status"] == "SUCCESS", task
    return task


def submit(client: httpx.Client, prompt: str) -> str:
    r = client.post("/api/flux/text-to-image", json={"prompt": prompt, "model": "fal-ai/flux-1/schnell"})
    assert r.status_code == 202, r.text
    return r.json()["task_id"]


def wait_until(check: Any, what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


def story(stack: Stack, task_id: str) -> list[str]:
    return [json.loads(line)["type"] for line in stack.cli("events", task_id, "--json").splitlines()]


def bob(stack: Stack) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.cli('token', '--user', 'bob').strip()}"}


def test_cancel_before_and_during_generation(stack: Stack, client: httpx.Client, fal: Fal) -> None:
    running_prompt, waiting_prompt = f"running {uuid.uuid4().hex}", f"waiting {uuid.uuid4().hex}"
    running = submit(client, running_prompt)
    follow(client, running, {"IN_PROGRESS", "SUCCESS", "FAILED", "CANCELLED"})
    waiting = submit(client, waiting_prompt)  # the one slot is taken: it waits its turn
    assert client.get(f"/api/flux/task/{waiting}").json()["status"] == "PENDING"

    r = client.post(f"/api/flux/task/{waiting}/cancel")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "CANCELLED"
    r = client.post(f"/api/flux/task/{running}/cancel")
    assert r.status_code == 200, r.text

    assert follow(client, waiting, {"CANCELLED", "SUCCESS", "FAILED"})[0]["status"] == "CANCELLED"
    task = follow(client, running, {"CANCELLED", "SUCCESS", "FAILED"})[0]
    assert task["status"] == "CANCELLED" and task["completed_at"] is not None
    assert fal.submitted(running_prompt) == 1
    request_id = task["request_id"]
    wait_until(
        lambda: fal.status(request_id).get("error_type") == "request_cancelled", "fal shows it cancelled"
    )
    assert fal.submitted(waiting_prompt) == 0  # the waiting one never reached fal

    after = submit(client, f"after {uuid.uuid4().hex}")  # the slot was given back
    assert follow(client, after, {"SUCCESS", "FAILED", "CANCELLED"})[0]["status"] == "SUCCESS"
    assert fal.submitted(waiting_prompt) == 0
    assert story(stack, running).count("task.cancelled") == 1
    assert story(stack, waiting) == ["task.requested", "task.cancelled"]


def test_cancelling_an_ended_task_is_a_409_and_another_users_task_a_404(
    stack: Stack, client: httpx.Client, finished: dict
) -> None:
    r = client.post(f"/api/flux/task/{finished['id']}/cancel")
    assert r.status_code == 409
    assert "already ended (SUCCESS)" in r.json()["message"]
    r = httpx.post(f"{stack.url}/api/flux/task/{finished['id']}/cancel", headers=bob(stack))
    assert r.status_code == 404 and finished["id"] in r.json()["message"]
    r = client.post(f"/api/flux/task/{uuid.uuid4().hex}/cancel")
    assert r.status_code == 404 and "not found" in r.json()["message"]
    assert client.get(f"/api/flux/task/{finished['id']}").json()["status"] == "SUCCESS"


def test_a_retry_is_a_new_task_with_the_same_inputs_linked_both_ways(
    stack: Stack, client: httpx.Client, finished: dict
) -> None:
    r = client.post(f"/api/flux/task/{finished['id']}/retry")
    assert r.status_code == 202, r.text
    new_id = r.json()["task_id"]
    assert new_id != finished["id"] and r.headers["location"] == f"/api/flux/task/{new_id}"
    task = follow(client, new_id, {"SUCCESS", "FAILED", "CANCELLED"})[0]
    assert task["status"] == "SUCCESS" and task["retry_of"] == finished["id"]
    assert (task["prompt"], task["seed"], task["model"]) == (finished["prompt"], 7, finished["model"])
    old = client.get(f"/api/flux/task/{finished['id']}").json()
    assert new_id in old["retried_by"] and old["retry_of"] is None
    listed = {t["id"]: t for t in client.get("/api/flux/history?limit=100").json()["items"]}
    assert new_id in listed[finished["id"]]["retried_by"]

    r = httpx.post(f"{stack.url}/api/flux/task/{finished['id']}/retry", headers=bob(stack))
    assert r.status_code == 404
    live = submit(client, f"live {uuid.uuid4().hex}")
    r = client.post(f"/api/flux/task/{live}/retry")
    assert r.status_code == 409 and "not ended" in r.json()["message"]
    client.post(f"/api/flux/task/{live}/cancel")
    follow(client, live, {"SUCCESS", "FAILED", "CANCELLED"})


def test_fal_webhooks_complete_tasks_once_while_polling_races_them(stack: Stack, finished: dict) -> None:
    types = story(stack, finished["id"])
    assert "task.webhook_received" in types  # fal's signed webhook reached the gateway
    assert types.count("task.completed") == 1
    assert "task.failed" not in types and "task.cancelled" not in types
    assert types[-1] == "task.images_stored" or types[-2] == "task.images_stored"


def test_forged_stale_and_replayed_webhooks_are_refused(stack: Stack, fal: Fal, finished: dict) -> None:
    url = f"{stack.url}/api/flux/webhooks/fal/{finished['id']}"
    request_id = finished["request_id"]
    body = json.dumps(
        {
            "request_id": request_id,
            "gateway_request_id": request_id,
            "status": "OK",
            "payload": {"images": [{"url": f"{fal.url}/files/x/0.png"}]},
        }
    ).encode()

    genuine = fal.sign(body, request_id)
    first = httpx.post(url, content=body, headers=genuine)
    assert first.status_code == 200, first.text
    replay = httpx.post(url, content=body, headers=genuine)
    assert replay.status_code == 401 and "replayed" in replay.json()["message"]

    refused = {
        "forged": httpx.post(
            url, content=body, headers=fal.sign(body, request_id, key=Ed25519PrivateKey.generate())
        ),
        "stale": httpx.post(url, content=body, headers=fal.sign(body, request_id, at=time.time() - 600)),
        "unsigned": httpx.post(url, content=body, headers={"Content-Type": "application/json"}),
        "tampered": httpx.post(
            url, content=body.replace(b"OK", b"ERROR"), headers=fal.sign(body, request_id)
        ),
    }
    other_body = body.replace(request_id.encode(), b"another-request")
    refused["other request"] = httpx.post(
        url, content=other_body, headers=fal.sign(other_body, "another-request")
    )
    for name, answer in refused.items():
        assert answer.status_code == 401, (name, answer.text)
        assert answer.json()["message"], name
    assert "stale" in refused["stale"].json()["message"]
    assert "does not verify" in refused["forged"].json()["message"]

    unknown = f"{stack.url}/api/flux/webhooks/fal/{uuid.uuid4().hex}"
    fresh = fal.sign(body, request_id)
    assert httpx.post(unknown, content=body, headers=fresh).status_code == 404

    task = httpx.get(f"{stack.url}/api/flux/task/{finished['id']}", headers=stack.auth).json()
    assert task["status"] == "SUCCESS" and task["image_url"] == finished["image_url"]
    assert story(stack, finished["id"]).count("task.completed") == 1


def test_a_model_error_reported_by_webhook_or_poll_fails_the_task_once(
    stack: Stack, client: httpx.Client
) -> None:
    task_id = submit(client, f"something forbidden {uuid.uuid4().hex}")
    task = follow(client, task_id, {"SUCCESS", "FAILED", "CANCELLED"})[0]
    assert task["status"] == "FAILED" and "flagged by a content checker" in task["error_message"]
    types = story(stack, task_id)
    assert types.count("task.failed") == 1 and "task.completed" not in types
