"""Operators meet the whole stack (``fluxpipe up``, one for this module): every service's
``/metrics`` parses and moves with the work, the admin stats match what happened, and
``replay``, ``stuck`` and ``dlq`` work against it while the API keeps answering."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from services.common.embedded import free_port, port_is_free
from services.common.metrics import METRICS_OFFSETS
from tests.test_admin_stats import samples
from tests.test_e2e import Stack, follow

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = free_port()
    while not all(port_is_free(base + offset) for offset in METRICS_OFFSETS.values()):
        base = free_port()
    stack = Stack(tmp_path_factory.mktemp("fluxpipe-ops"), extra_env={"FLUXPIPE_METRICS_PORT": str(base)})
    stack.metrics_base = base  # type: ignore[attr-defined]
    yield stack
    if stack.proc.poll() is None:
        stack.stop()


def scrape(url: str, wait: float = 30) -> str:
    """The metrics text at ``url``, waiting for the service to listen."""
    deadline = time.monotonic() + wait
    while True:
        try:
            r = httpx.get(url, timeout=5)
            if r.status_code == 200:
                return r.text
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"no metrics at {url}"
        time.sleep(0.2)


def total(text: str, name: str, **labels: str) -> float:
    return sum(
        value for key, value in samples(text, name).items() if all((k, v) in key for k, v in labels.items())
    )


def worker_metrics(stack: Stack) -> dict[str, str]:
    base = stack.metrics_base  # type: ignore[attr-defined]
    return {name: scrape(f"http://127.0.0.1:{base + off}/metrics") for name, off in METRICS_OFFSETS.items()}


@dataclass
class Work:
    """Two tasks run once for the module: one succeeds (and is stored), one fal refuses."""

    before: dict[str, str]
    gateway_before: str
    ok: str
    bad: str


@pytest.fixture(scope="module")
def work(stack: Stack) -> Work:
    before = worker_metrics(stack)
    gateway_before = scrape(f"{stack.url}/metrics")
    with httpx.Client(base_url=stack.url, headers=stack.auth, timeout=10) as client:
        ok = client.post("/api/flux/text-to-image", json={"prompt": "a red kite", "seed": 1}).json()[
            "task_id"
        ]
        bad = client.post("/api/flux/text-to-image", json={"prompt": "something forbidden"}).json()["task_id"]
        assert follow(client, ok, {"SUCCESS", "FAILED"})[0]["status"] == "SUCCESS"
        assert follow(client, bad, {"SUCCESS", "FAILED"})[0]["status"] == "FAILED"

        def stored() -> bool:
            return client.get(f"/api/flux/task/{ok}").json()["cloud_image_url"] is not None

        deadline = time.monotonic() + 30
        while not stored():
            assert time.monotonic() < deadline
            time.sleep(0.1)
    return Work(before, gateway_before, ok, bad)


def test_every_service_serves_metrics_that_move_with_the_work(stack: Stack, work: Work) -> None:
    before, gateway_before = work.before, work.gateway_before
    gateway = scrape(f"{stack.url}/metrics")
    route = "/api/flux/text-to-image"
    assert total(gateway, "fluxpipe_http_requests_total", route=route, status="202") == (
        total(gateway_before, "fluxpipe_http_requests_total", route=route, status="202") + 2
    )

    deadline = time.monotonic() + 30
    while True:
        after = worker_metrics(stack)
        moved = {
            "submitter": total(after["submitter"], "fluxpipe_events_handled_total", consumer="submitter")
            >= total(before["submitter"], "fluxpipe_events_handled_total", consumer="submitter") + 2,
            "poller": total(after["poller"], "fluxpipe_events_handled_total", consumer="poller")
            >= total(before["poller"], "fluxpipe_events_handled_total", consumer="poller") + 2,
            "uploader": total(after["uploader"], "fluxpipe_events_handled_total", consumer="uploader")
            >= total(before["uploader"], "fluxpipe_events_handled_total", consumer="uploader") + 1,
            "projector": total(after["projector"], "fluxpipe_projector_events_applied_total")
            >= total(before["projector"], "fluxpipe_projector_events_applied_total") + 8,
        }
        if all(moved.values()):
            break
        assert time.monotonic() < deadline, moved
        time.sleep(0.5)

    assert total(after["submitter"], "fluxpipe_fal_request_seconds_count", operation="submit") >= 2
    assert total(after["poller"], "fluxpipe_fal_request_seconds_count", operation="status") >= 2
    assert total(after["poller"], "fluxpipe_fal_errors_total", operation="result", status="422") >= 1
    assert total(after["uploader"], "fluxpipe_storage_bytes_total", backend="local") > 0
    assert total(after["uploader"], "fluxpipe_storage_objects_total", backend="local") >= 1
    assert total(after["projector"], "fluxpipe_projector_lag_events") >= 0
    for text in after.values():  # the fal key is in no label and no help text
        assert "e2e-key" not in text


def test_admin_stats_match_the_tasks_that_ran(stack: Stack, work: Work) -> None:
    admin = {"Authorization": f"Bearer {stack.cli('token', '--user', 'ops', '--admin').strip()}"}
    r = httpx.get(f"{stack.url}/api/flux/admin/stats", headers=admin, timeout=10)
    assert r.status_code == 200, r.text
    s = r.json()
    assert s["finished"] == s["tasks"] >= 2
    assert s["by_status"]["SUCCESS"] >= 1 and s["by_status"]["FAILED"] >= 1
    assert s["success_rate"] == s["by_status"]["SUCCESS"] / s["finished"]
    assert s["provider_failure_rate"] == s["by_status"]["FAILED"] / s["finished"]
    assert s["timeout_rate"] == 0 and s["upload_failure_rate"] == 0
    assert s["storage_used_bytes"] > 0 and s["generation_time_p95"] >= s["generation_time_mean"] > 0
    assert httpx.get(f"{stack.url}/api/flux/admin/stats", headers=stack.auth).status_code == 403


def test_replay_stuck_and_dlq_against_the_running_stack(stack: Stack, work: Work) -> None:
    with httpx.Client(base_url=stack.url, headers=stack.auth, timeout=10) as client:
        before = client.get("/api/flux/history", params={"limit": 100}).json()
        out = stack.cli("replay")  # progress goes to stderr; nothing to stdout
        assert out == ""
        after = client.get("/api/flux/history", params={"limit": 100}).json()
    assert after == before and before["total"] >= 2

    assert json.loads(stack.cli("stuck", "--older-than", "0", "--json")) == []
    assert "no task is unfinished" in stack.cli("stuck")
    assert stack.cli("dlq", "list").strip() == "no dead letters"
    status = json.loads(stack.cli("status", "--json"))
    assert status["dead_letters"] == {} and status["projector"]["behind_at_most"] == 0
