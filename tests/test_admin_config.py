"""Admin configuration through the gateway, on real NATS and PostgreSQL: admins only, the fal key
encrypted and never shown, a change reaching a running submitter and poller without a restart,
``enabled=false`` refusing new jobs, credits and fair share at the submit route."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import text

from services.common.auth import issue_token
from services.common.config import LiveConfig, new_config_key
from services.poller.main import worker as poller_worker
from services.projector.main import project
from services.submitter.main import worker as submitter_worker
from tests.simulator_server import TEST_API_KEY
from tests.test_bus import wait_for

NEW_KEY = "fal-live-key:9f8e7d6c5b4a39281706"


@pytest.fixture
def settings(settings):
    settings.config_key = SecretStr(new_config_key())
    return settings


@pytest.fixture
async def projector(bus, engine) -> AsyncIterator[None]:
    stop = asyncio.Event()
    runner = asyncio.create_task(project(bus, engine, stop))
    yield
    stop.set()
    await runner


@pytest.fixture
def root(settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_token(settings, 'root', admin=True)}"}


@pytest.fixture
def alice(settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_token(settings, 'alice')}"}


async def job(client: httpx.AsyncClient, who: dict[str, str], **extra: object) -> httpx.Response:
    return await client.post("/api/flux/text-to-image", json={"prompt": "a kite", **extra}, headers=who)


async def test_config_and_grants_are_for_admins_only(client, alice):
    for method, url, body in (
        ("GET", "/api/flux/admin/config", None),
        ("PUT", "/api/flux/admin/config", {"enabled": False}),
        ("POST", "/api/flux/admin/credits/alice", {"amount": 5, "reason": "mine"}),
    ):
        r = await client.request(method, url, json=body, headers=alice)
        assert r.status_code == 403 and r.json()["message"] == "this route is for administrators only"


async def test_the_key_is_stored_encrypted_shown_masked_and_never_in_events_or_responses(
    client, root, bus, engine, projector
):
    r = await client.put("/api/flux/admin/config", json={"api_key": NEW_KEY, "timeout": 120}, headers=root)
    assert r.status_code == 200, r.text
    assert r.json()["api_key"] == "****1706" and r.json()["api_key_source"] == "config"
    bodies = [r.text]

    async def projected() -> bool:
        async with engine.connect() as conn:
            return (await conn.execute(text("select timeout from flux_config"))).scalar() == 120

    await wait_for(projected)
    r = await client.get("/api/flux/admin/config", headers=root)
    assert r.json()["api_key"] == "****1706" and r.json()["updated_by"] == "root"
    bodies.append(r.text)
    async with engine.connect() as conn:
        stored = (await conn.execute(text("select api_key from flux_config"))).scalar_one()
    assert stored and NEW_KEY not in stored
    events = [data async for _, _, data in bus.iter_raw(f"{bus.prefix}.>")]
    assert events and all(NEW_KEY.encode() not in data for data in events)
    for part in (NEW_KEY, *NEW_KEY.split(":")):
        assert all(part not in body for body in bodies)


async def test_a_tampered_key_fails_loudly_and_is_never_used(
    client, root, engine, projector, settings, caplog
):
    await client.put("/api/flux/admin/config", json={"api_key": NEW_KEY}, headers=root)

    async def projected() -> bool:
        async with engine.connect() as conn:
            return bool((await conn.execute(text("select api_key from flux_config"))).scalar())

    await wait_for(projected)
    async with engine.begin() as conn:
        stored = (await conn.execute(text("select api_key from flux_config"))).scalar_one()
        tampered = stored[:40] + ("A" if stored[40] != "A" else "B") + stored[41:]
        await conn.execute(text("update flux_config set api_key = :k"), {"k": tampered})
    r = await client.get("/api/flux/admin/config", headers=root)
    assert r.status_code == 500
    assert "failed its integrity check" in r.json()["message"] and NEW_KEY not in r.text

    # A service handed that ciphertext keeps the key it had, and says why.
    from schemas.events import ConfigChangedData
    from services.common.config import from_settings

    service = settings.model_copy(update={"fal_key": SecretStr("previous-key-123")})
    live = LiveConfig(service)
    with caplog.at_level(logging.ERROR):
        await live.apply(
            1, ConfigChangedData(**{**from_settings(service).model_dump(), "api_key_encrypted": tampered})
        )
    assert service.fal_key.get_secret_value() == "previous-key-123"
    assert "failed its integrity check" in caplog.text and NEW_KEY not in caplog.text


async def test_disabled_answers_new_jobs_503_and_enabled_again_accepts(client, root, alice):
    assert (await job(client, alice)).status_code == 202
    r = await client.put("/api/flux/admin/config", json={"enabled": False}, headers=root)
    assert r.status_code == 200 and r.json()["enabled"] is False
    r = await job(client, alice)
    assert r.status_code == 503 and "turned off by an administrator" in r.json()["message"]
    assert r.headers["retry-after"]
    r = await client.post("/v1/images/generations", json={"prompt": "a kite"}, headers=alice)
    assert r.status_code == 503 and "turned off by an administrator" in r.json()["error"]["message"]
    await client.put("/api/flux/admin/config", json={"enabled": True}, headers=root)
    assert (await job(client, alice)).status_code == 202


async def test_invalid_config_names_the_field(client, root):
    r = await client.put(
        "/api/flux/admin/config",
        json={"default_model": "fal-ai/flux-pro/kontext", "credit_costs": {"nope": 1}},
        headers=root,
    )
    assert r.status_code == 422
    assert "default_model: must be a text-to-image model" in r.json()["message"]
    assert "credit_costs: unknown model 'nope'" in r.json()["message"]


async def test_credits_402_with_the_balance_then_grant_then_spend(client, root, alice, projector):
    costs = {"fal-ai/flux-1/dev": 3, "fal-ai/flux-1/schnell": 1}
    await client.put("/api/flux/admin/config", json={"credit_costs": costs}, headers=root)
    r = await job(client, alice)
    assert r.status_code == 402
    assert r.json()["balance"] == 0 and r.json()["cost"] == 3
    assert r.json()["message"] == "this job costs 3 credits and your balance is 0"

    r = await client.post("/v1/images/generations", json={"prompt": "a kite"}, headers=alice)
    assert (
        r.status_code == 402
        and r.json()["error"]["message"] == "this job costs 3 credits and your balance is 0"
    )
    r = await client.post(
        "/api/flux/admin/credits/alice", json={"amount": 4, "reason": "trial credits"}, headers=root
    )
    assert r.status_code == 200 and r.json()["balance"] == 4
    assert (await job(client, alice)).status_code == 202
    r = await job(client, alice)
    assert r.status_code == 402 and r.json()["balance"] == 1
    assert (await job(client, alice, model="fal-ai/flux-1/schnell", num_inference_steps=4)).status_code == 202

    async def ledger_projected() -> bool:
        r = await client.get("/api/flux/credits", headers=alice)
        return r.json()["ledger_total"] == 3

    await wait_for(ledger_projected)
    mine = (await client.get("/api/flux/credits", headers=alice)).json()
    assert (mine["balance"], mine["held"], mine["credits_enabled"]) == (0, 4, True)
    assert [e["kind"] for e in mine["ledger"]] == ["held", "held", "granted"]
    assert mine["ledger"][-1]["reason"] == "trial credits" and mine["ledger"][-1]["actor"] == "root"
    r = await client.post("/api/flux/admin/credits/alice", json={"amount": -5, "reason": "x"}, headers=root)
    assert r.status_code == 409 and "the balance is 0" in r.json()["message"]


async def test_a_user_at_the_in_flight_cap_gets_429_while_others_get_in(client, alice, settings):
    settings.max_tasks_per_user = 2
    assert [(await job(client, alice)).status_code for _ in range(4)] == [202, 202, 429, 429]
    r = await job(client, alice)
    assert "you already have 2 unfinished tasks" in r.json()["message"] and r.headers["retry-after"]
    bob = {"Authorization": f"Bearer {issue_token(settings, 'bob')}"}
    assert (await job(client, bob)).status_code == 202


async def test_a_config_change_reaches_a_running_submitter_and_poller(
    client, root, alice, bus, settings, fast
):
    """The workers start with a wrong key and base URL; the change alone makes jobs succeed."""
    assert settings.fal_base_url != fast.public_url
    workers = []
    stop = asyncio.Event()
    for worker in (submitter_worker, poller_worker):
        own = settings.model_copy()
        workers.append(asyncio.create_task(worker.main(own, stop)))

    async def consumer_has(limit: int) -> bool:
        try:
            info = await bus.js.consumer_info(bus.stream, "submitter")
        except Exception:
            return False
        return info.config.max_ack_pending == limit

    try:
        await wait_for(lambda: consumer_has(settings.max_concurrent_tasks))
        r = await client.put(
            "/api/flux/admin/config",
            json={"base_url": fast.public_url, "api_key": TEST_API_KEY, "max_concurrent_tasks": 3},
            headers=root,
        )
        assert r.status_code == 200
        await wait_for(lambda: consumer_has(3))
        task = (await job(client, alice, model="fal-ai/flux-1/schnell", num_inference_steps=2)).json()[
            "task_id"
        ]

        async def completed() -> bool:
            return await bus.last_event(task, "completed") is not None

        await wait_for(completed, timeout=30)
        submitted = await bus.last_event(task, "submitted")
        assert submitted is not None and submitted.data.status_url.startswith(fast.public_url)
    finally:
        stop.set()
        await asyncio.gather(*workers)
