"""The stack as an attacker meets it: ``fluxpipe up`` with NATS authentication, Open WebUI's
forwarded users, and a sweep of every event, log line and response for the fal key."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import nats
import nats.errors
import nats.js.errors
import pytest

from schemas.events import (
    FluxEvent,
    TaskRequested,
    TaskRequestedData,
    TaskSubmitted,
    TaskSubmittedData,
    encode_event,
)
from services.common.bus import Bus, NatsCredentialsRejected
from services.common.nats_auth import USERS_FILE
from services.common.settings import Settings
from tests.test_e2e import FAL_KEY, Stack, follow

pytestmark = pytest.mark.timeout(240)

SERVICE_KEY = "owui-" + "s" * 40


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    keys = [{"user_id": "open-webui", "key": SERVICE_KEY, "assert_users": True}]
    stack = Stack(
        tmp_path_factory.mktemp("fluxpipe-secure"), extra_env={"FLUXPIPE_SERVICE_KEYS": json.dumps(keys)}
    )
    yield stack
    if stack.proc.poll() is None:
        stack.stop()


class Recorder:
    """Every response body and header the tests received, to search for secrets afterwards."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def __call__(self, response: httpx.Response) -> None:
        response.read()
        self.texts.append(response.text)
        self.texts.append(json.dumps(dict(response.headers)))


@pytest.fixture(scope="module")
def responses() -> Recorder:
    return Recorder()


def client(stack: Stack, recorder: Recorder, headers: dict[str, str] | None = None) -> httpx.Client:
    return httpx.Client(
        base_url=stack.url,
        headers=stack.auth if headers is None else headers,
        timeout=10,
        event_hooks={"response": [recorder]},
    )


def nats_settings(stack: Stack, user: str | None) -> Settings:
    runtime = json.loads((stack.data_dir / "runtime.json").read_text())
    users = json.loads((stack.data_dir / USERS_FILE).read_text())
    extra = {"NATS_USER": user, "NATS_PASSWORD": users[user]} if user else {}
    return Settings(NATS_URL=runtime["NATS_URL"], **extra)


def test_tasks_run_with_every_service_on_its_own_nats_user(stack: Stack, responses: Recorder) -> None:
    with client(stack, responses) as c:
        ok = c.post(
            "/api/flux/text-to-image", json={"prompt": "a quiet harbour"}, headers={"Idempotency-Key": "k"}
        )
        bad = c.post("/api/flux/text-to-image", json={"prompt": "something forbidden"})
        for r in (ok, bad):
            assert r.status_code == 202, r.text
        task, _ = follow(c, ok.json()["task_id"], {"SUCCESS", "FAILED"})
        assert task["status"] == "SUCCESS" and task["cloud_image_url"]
        failed, _ = follow(c, bad.json()["task_id"], {"SUCCESS", "FAILED"})
        assert failed["status"] == "FAILED"
        assert c.get(task["cloud_image_url"]).status_code == 200
    events = stack.cli("events", ok.json()["task_id"])  # the operators' own NATS user
    assert "task.images_stored" in events
    for name in ("gateway", "submitter", "poller", "uploader", "projector"):
        assert f"NATS_USER={name}" not in stack.output  # no service failed on its credentials


def test_nobody_without_credentials_reaches_the_event_log(stack: Stack) -> None:
    async def attempt() -> None:
        with pytest.raises(NatsCredentialsRejected):
            await Bus.connect(nats_settings(stack, None), "intruder", ensure=False, reconnect=False)
        with pytest.raises(nats.errors.Error):
            await nats.connect(
                nats_settings(stack, None).nats_url, max_reconnect_attempts=1, connect_timeout=2
            )

    asyncio.run(attempt())


def test_the_gateways_credentials_cannot_forge_a_submission(stack: Stack) -> None:
    async def attempt() -> list[FluxEvent]:
        gateway = await Bus.connect(nats_settings(stack, "gateway"), "gateway", ensure=False)
        operator = await Bus.connect(nats_settings(stack, "operator"), "operator", ensure=False)
        try:
            job = TaskRequestedData(model="fal-ai/flux-1/dev", task_type="text_to_image", prompt="forge me")
            requested = TaskRequested(task_id=uuid.uuid4().hex, user_id="victim", data=job)
            await gateway.publish(requested)  # the gateway's own event: allowed
            evil = "http://attacker.example/steal-the-key"
            forged = TaskSubmitted.caused_by(
                requested,
                TaskSubmittedData(request_id="x", status_url=evil, response_url=evil, cancel_url=evil),
            )
            with pytest.raises((nats.errors.Error, TimeoutError)):
                await gateway.js.publish(
                    forged.subject(gateway.prefix), encode_event(forged), stream=gateway.stream, timeout=1
                )
            await operator.wait_for_any(requested.task_id, ("submitted", "failed"), recheck=0.5)
            return [e for _, e in await operator.task_story(requested.task_id)]
        finally:
            await gateway.close()
            await operator.close()

    story = asyncio.run(attempt())
    submitted = [e for e in story if isinstance(e, TaskSubmitted)]
    assert submitted or any(e.token == "failed" for e in story)  # the real submitter took the job
    assert all("attacker" not in e.data.status_url for e in submitted)
    assert "attacker.example" not in stack.output


def test_open_webui_forwards_its_users_through_a_service_key(stack: Stack, responses: Recorder) -> None:
    as_dora = {
        "Authorization": f"Bearer {SERVICE_KEY}",
        "X-OpenWebUI-User-Id": "dora-id",
        "X-OpenWebUI-User-Name": quote("Dora Ä"),
        "X-OpenWebUI-User-Role": "user",
    }
    with client(stack, responses, as_dora) as c:
        r = c.post("/api/flux/text-to-image", json={"prompt": "a paper boat"})
        assert r.status_code == 202
        assert c.get(f"/api/flux/task/{r.json()['task_id']}").status_code == 200
        deadline = time.monotonic() + 30
        while c.get("/api/flux/history").json()["total"] != 1:  # once the projector has it
            assert time.monotonic() < deadline, "dora's task never reached her history"
            time.sleep(0.1)
    forged = {**stack.auth, "X-OpenWebUI-User-Id": "dora-id"}
    with client(stack, responses, forged) as c:
        r = c.get("/api/flux/history")
        assert r.status_code == 403 and "assert users" in r.json()["message"]


def test_the_fal_key_is_in_no_event_log_line_or_response(stack: Stack, responses: Recorder) -> None:
    with client(stack, responses) as c:
        r = c.post("/api/flux/text-to-image", json={"prompt": "a lantern"})
        follow(c, r.json()["task_id"], {"SUCCESS", "FAILED"})
        for path in (
            "/openapi.json",
            "/docs",
            "/healthz",
            "/readyz",
            "/api/flux/history",
            "/api/flux/task/nope",
        ):
            c.get(path)
        c.post("/api/flux/text-to-image", json={"prompt": "x", "num_images": 99})
        for task in c.get("/api/flux/history").json()["items"]:
            c.get(f"/api/flux/task/{task['id']}")
    with client(stack, responses, {}) as anonymous:
        anonymous.get("/api/flux/history")
    assert len(responses.texts) >= 16

    async def every_event() -> list[bytes]:
        operator = await Bus.connect(nats_settings(stack, "operator"), "operator", ensure=False)
        try:
            found = []
            seq = 1
            while True:
                try:
                    msg = await operator.js.get_msg(operator.stream, seq=seq, subject=">", next=True)
                except nats.js.errors.NotFoundError:
                    return found
                found.append((msg.data or b"") + json.dumps(msg.headers or {}).encode())
                seq = (msg.seq or seq) + 1
        finally:
            await operator.close()

    events = asyncio.run(every_event())
    assert len(events) >= 10
    logs = [stack.output] + [p.read_text(errors="replace") for p in Path(stack.data_dir).rglob("*.log")]
    assert "completed with 1 image" in stack.output  # the services' INFO logs are in the output
    secret_parts = (FAL_KEY, FAL_KEY.split(":")[1])
    for where, texts in (
        ("event", [e.decode(errors="replace") for e in events]),
        ("log", logs),
        ("response", responses.texts),
    ):
        for text in texts:
            assert not any(part in text for part in secret_parts), f"the fal key is in a {where}"
