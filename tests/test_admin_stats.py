"""``GET /api/flux/admin/stats``: the plan's figures from the read models, for admins only;
and the gateway's ``/metrics``."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families

from schemas.events import TaskRequested, TaskRequestedData
from services.common.auth import issue_token
from services.projector.main import project
from tests.test_replay import caught_up, task_story

SCHNELL = "fal-ai/flux-1/schnell"


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample of metric ``name`` in Prometheus text, keyed by its labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


async def publish_known_tasks(bus) -> None:
    """Eight tasks of known outcome in the window, one from two days before it."""
    stories = [
        task_story("ok1", "stored", generation_time=1.0),
        task_story("ok2", "stored", generation_time=2.0),
        task_story("ok3", "stored", generation_time=3.0),
        task_story("ok4", "storage_failed", model=SCHNELL, generation_time=4.0),
        task_story("f1", "failed"),  # fal's result was an error
        task_story("f2", "failed_submit"),  # fal refused the submit
        task_story("t1", "timeout"),
        task_story("r1", "running"),
    ]
    for story in stories:
        for event in story:
            await bus.publish(event)
    old = TaskRequested(
        task_id="old1",
        user_id="alice",
        occurred_at=datetime.now(UTC) - timedelta(days=2),
        data=TaskRequestedData(model=SCHNELL, task_type="text_to_image"),
    )
    await bus.publish(old)


async def test_stats_give_the_plans_figures_for_a_known_set_of_tasks(client, bus, engine, settings):
    await publish_known_tasks(bus)
    stop = asyncio.Event()
    projector = asyncio.create_task(project(bus, engine, stop))
    try:
        await caught_up(bus, engine)
    finally:
        stop.set()
        await projector
    admin = {"Authorization": f"Bearer {issue_token(settings, 'ops', admin=True)}"}

    r = await client.get("/api/flux/admin/stats", headers=admin)
    assert r.status_code == 200, r.text
    s = r.json()
    assert s["tasks"] == 8 and s["finished"] == 7
    assert s["by_status"] == {"SUCCESS": 4, "FAILED": 3, "IN_PROGRESS": 1}
    assert s["success_rate"] == pytest.approx(4 / 7)
    assert s["generation_time_mean"] == pytest.approx(2.5)
    assert s["generation_time_p95"] == pytest.approx(3.85)  # percentile_cont over 1, 2, 3, 4
    assert s["use_per_model"] == [
        {"model": "fal-ai/flux-1/dev", "tasks": 7, "succeeded": 3},
        {"model": SCHNELL, "tasks": 1, "succeeded": 1},
    ]
    assert (s["storage_used_bytes"], s["stored_images"]) == (3000, 3)
    assert s["provider_failure_rate"] == pytest.approx(2 / 7)
    assert s["timeout_rate"] == pytest.approx(1 / 7)
    assert s["upload_failure_rate"] == pytest.approx(1 / 4)

    since = (datetime.now(UTC) - timedelta(days=3)).isoformat()
    until = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    r = await client.get("/api/flux/admin/stats", params={"since": since, "until": until}, headers=admin)
    old = r.json()
    assert (old["tasks"], old["finished"], old["success_rate"], old["use_per_model"][0]["model"]) == (
        1,
        0,
        None,
        SCHNELL,
    )


async def test_stats_are_for_admins_and_name_a_bad_window(client, settings):
    alice = {"Authorization": f"Bearer {issue_token(settings, 'alice')}"}
    r = await client.get("/api/flux/admin/stats", headers=alice)
    assert r.status_code == 403 and "admin" in r.json()["message"]
    admin = {"Authorization": f"Bearer {issue_token(settings, 'ops', admin=True)}"}
    r = await client.get(
        "/api/flux/admin/stats",
        params={"since": "2026-01-02T00:00:00Z", "until": "2026-01-01"},
        headers=admin,
    )
    assert r.status_code == 422 and "since" in r.json()["message"]
    r = await client.get("/api/flux/admin/stats", params={"since": "yesterday"}, headers=admin)
    assert r.status_code == 422 and r.json()["message"].startswith("query.since:")
    assert (await client.get("/api/flux/admin/stats")).status_code == 401


async def test_the_gateways_metrics_parse_and_count_its_requests(client, settings):
    key = (("method", "GET"), ("route", "/api/flux/history"), ("status", "200"))
    before = samples((await client.get("/metrics")).text, "fluxpipe_http_requests_total").get(key, 0.0)
    alice = {"Authorization": f"Bearer {issue_token(settings, 'alice')}"}
    for _ in range(3):
        assert (await client.get("/api/flux/history", headers=alice)).status_code == 200
    r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    after = samples(r.text, "fluxpipe_http_requests_total")
    assert after[key] == before + 3
    assert not any("alice" in str(labels) for labels in after)
