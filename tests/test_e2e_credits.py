"""Credits and the admin configuration through ``fluxpipe up`` over HTTP: an admin sets model
costs and the fal key, grants credits; a job is held, charged on success, refunded on failure;
the key is kept encrypted and never shows in any event, log line or response."""

from __future__ import annotations

import asyncio
import stat
import time
from collections.abc import Iterator

import httpx
import pytest

from services.common.bus import Bus
from tests.test_e2e import FAL_KEY, Stack, follow
from tests.test_e2e_security import nats_settings

pytestmark = pytest.mark.timeout(240)

COST = 2


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("fluxpipe-credits"))
    yield stack
    if stack.proc.poll() is None:
        stack.stop()


def admin_of(stack: Stack) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.cli('token', '--user', 'root', '--admin').strip()}"}


def balance(client: httpx.Client) -> tuple[int, int, int]:
    mine = client.get("/api/flux/credits").json()
    return mine["balance"], mine["held"], mine["total_used"]


def wait_balance(client: httpx.Client, expected: tuple[int, int, int]) -> None:
    for _ in range(300):
        if balance(client) == expected:
            return
        time.sleep(0.1)
    raise AssertionError(f"balance stayed {balance(client)}, expected {expected}")


def all_events(stack: Stack) -> list[bytes]:
    async def read() -> list[bytes]:
        bus = await Bus.connect(nats_settings(stack, "operator"), "test", ensure=False)
        try:
            return [data async for _, _, data in bus.iter_raw(f"{bus.prefix}.>")]
        finally:
            await bus.close()

    return asyncio.run(read())


def test_a_job_is_held_charged_on_success_and_refunded_on_failure(stack: Stack) -> None:
    root = admin_of(stack)
    with (
        httpx.Client(base_url=stack.url, timeout=10) as admin,
        httpx.Client(base_url=stack.url, headers=stack.auth, timeout=10) as client,
    ):
        r = admin.put(
            "/api/flux/admin/config", json={"credit_costs": {"fal-ai/flux-1/dev": COST}}, headers=root
        )
        assert r.status_code == 200, r.text
        r = client.post("/api/flux/text-to-image", json={"prompt": "a paid lighthouse"})
        assert r.status_code == 402 and r.json()["balance"] == 0
        r = admin.post("/api/flux/admin/credits/dev", json={"amount": 3, "reason": "e2e"}, headers=root)
        assert r.json()["balance"] == 3

        ok = client.post("/api/flux/text-to-image", json={"prompt": "a paid lighthouse"})
        assert ok.status_code == 202
        assert client.post("/api/flux/text-to-image", json={"prompt": "one more"}).status_code == 402
        task, _ = follow(client, ok.json()["task_id"], {"SUCCESS", "FAILED"})
        assert task["status"] == "SUCCESS"
        wait_balance(client, (1, 0, COST))

        admin.post("/api/flux/admin/credits/dev", json={"amount": 1, "reason": "e2e"}, headers=root)
        bad = client.post("/api/flux/text-to-image", json={"prompt": "something forbidden"})
        assert bad.status_code == 202
        task, _ = follow(client, bad.json()["task_id"], {"SUCCESS", "FAILED"})
        assert task["status"] == "FAILED"
        wait_balance(client, (2, 0, COST))
        kinds = [e["kind"] for e in client.get("/api/flux/credits").json()["ledger"]]
        assert kinds.count("refunded") == 1 and kinds.count("charged") == 1


def test_the_fal_key_set_by_an_admin_is_encrypted_and_never_shown(stack: Stack) -> None:
    root = admin_of(stack)
    config_key = stack.data_dir / "config-key"
    assert stat.S_IMODE(config_key.stat().st_mode) == 0o600
    with (
        httpx.Client(base_url=stack.url, timeout=10) as admin,
        httpx.Client(base_url=stack.url, headers=stack.auth, timeout=10) as client,
    ):
        r = admin.put("/api/flux/admin/config", json={"api_key": FAL_KEY, "credit_costs": {}}, headers=root)
        assert r.status_code == 200 and r.json()["api_key"] == "****" + FAL_KEY[-4:]
        responses = [r.text]
        r = client.post("/api/flux/text-to-image", json={"prompt": "a key-safe lighthouse"})
        task, _ = follow(client, r.json()["task_id"], {"SUCCESS", "FAILED"})
        assert task["status"] == "SUCCESS"
        responses += [
            admin.get("/api/flux/admin/config", headers=root).text,
            client.get("/api/flux/credits").text,
        ]
    assert "configuration at stream seq" in stack.output  # the services applied it
    secret_parts = (FAL_KEY, FAL_KEY.split(":")[1])
    events = all_events(stack)
    assert any(b"config.changed" in e for e in events)
    for blob in [stack.output, *responses, *(e.decode() for e in events)]:
        assert not any(part in blob for part in secret_parts)
