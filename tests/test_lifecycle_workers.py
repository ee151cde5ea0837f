"""The provider side of a task's lifecycle, on real NATS and real HTTP servers.

The fal key only ever goes to fal's own origin; results are only downloaded from fal's result
hosts (redirects included); webhooks verify exactly as fal documents (forged and stale ones are
refused, rotated keys are fetched again); a poller back after the deadline still collects a job
fal finished; a stop during a submit lets it finish and never makes a second job at fal.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from schemas.events import (
    FluxEvent,
    ProviderImage,
    StorageFailed,
    TaskCompleted,
    TaskCompletedData,
    TaskFailed,
    TaskSubmitted,
)
from services.common.consumer import Consumer
from services.common.fal import FalClient, FalError
from services.common.fal_webhook import InvalidWebhook, WebhookVerifier
from services.common.result_hosts import ForeignResultHost, ResultHosts, result_client
from services.common.storage import make_storage
from services.poller.main import on_submitted
from services.submitter.main import SUBMIT_GRACE, submit_budget
from services.submitter.main import consumer as submitter_consumer
from services.uploader.main import on_completed
from tests.simulator_server import TEST_API_KEY, serve
from tests.test_bus import wait_for
from tests.test_workers import (
    CountingFal,
    has_event,
    requested,
    serve_submitter,
    submit_directly,
    submitter_holds,
    types_of,
)


class Recorder:
    """A plain HTTP server that records every request it gets and answers what it is told."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.redirect_to: str | None = None
        self.body: bytes = b"{}"

    def app(self, _: str) -> FastAPI:
        app = FastAPI()

        @app.api_route("/{path:path}", methods=["GET", "POST", "PUT"])
        async def any_path(path: str, request: Request) -> Response:
            self.hits[path] += 1
            if self.redirect_to is not None:
                return RedirectResponse(self.redirect_to, status_code=302)
            return Response(self.body, media_type="application/json")

        return app


@pytest.fixture
def recorders() -> Iterator[tuple[tuple[str, Recorder], tuple[str, Recorder]]]:
    first, second = Recorder(), Recorder()
    with serve(first.app) as first_url, serve(second.app) as second_url:
        yield (first_url, first), (second_url, second)


# --- only fal's hosts ---------------------------------------------------------------------------


async def test_the_fal_key_is_never_sent_to_urls_off_the_fal_host(fast, recorders):
    (elsewhere, recorder), _ = recorders
    async with FalClient(fast.public_url, TEST_API_KEY, max_attempts=1) as fal:
        handle = await fal.submit("fal-ai/flux-1/schnell", {"prompt": "a pier", "seed": 1})
        assert (await fal.status(handle.status_url)).status in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
        for url in (
            f"{elsewhere}/fal-ai/flux-1/requests/{handle.request_id}/status",
            f"{elsewhere}/fal-ai/flux-1/requests/{handle.request_id}",
            fast.public_url.replace("http://", "https://") + "/x",
        ):
            with pytest.raises(FalError) as refused:
                await fal.status(url)
            assert refused.value.error_type == "foreign_host" and not refused.value.retryable
            with pytest.raises(FalError):
                await fal.result(url)
            with pytest.raises(FalError):
                await fal.cancel(url)
    assert sum(recorder.hits.values()) == 0


def test_result_host_patterns():
    hosts = ResultHosts(("fal.media", "*.fal.media", "cdn.example:8443"), ("http", "127.0.0.1", 9000))
    allowed = [
        "https://fal.media/a.png",
        "https://v3.fal.media/f/x.jpg",
        "http://127.0.0.1:9000/files/r/0.png",
        "https://cdn.example:8443/i.png",
    ]
    refused = [
        "http://v3.fal.media/x.png",
        "https://fal.media.evil.example/x.png",
        "https://evilfal.media/x",
        "http://127.0.0.1:9001/files/r/0.png",
        "https://cdn.example/i.png",
        "https://169.254.169.254/",
    ]
    assert [hosts.allows(httpx.URL(u)) for u in allowed] == [True] * len(allowed)
    assert [hosts.allows(httpx.URL(u)) for u in refused] == [False] * len(refused)


async def test_results_are_downloaded_only_from_fal_hosts_and_redirects_are_checked(settings, recorders):
    (fal_host, fal_side), (other_host, other_side) = recorders
    settings.fal_base_url = fal_host
    async with result_client(settings, follow_redirects=True) as http:
        assert (await http.get(f"{fal_host}/files/r/0.png")).status_code == 200
        with pytest.raises(ForeignResultHost):
            await http.get(f"{other_host}/files/r/0.png")
        fal_side.redirect_to = f"{other_host}/internal/secret"
        with pytest.raises(ForeignResultHost):
            await http.get(f"{fal_host}/files/r/1.png")
    assert fal_side.hits["files/r/1.png"] == 1
    assert sum(other_side.hits.values()) == 0


# --- webhook verification -----------------------------------------------------------------------


def jwk(key: Ed25519PrivateKey) -> dict[str, str]:
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return {"kty": "OKP", "crv": "Ed25519", "x": base64.urlsafe_b64encode(raw).rstrip(b"=").decode()}


def signed(
    key: Ed25519PrivateKey, body: bytes, *, request_id: str = "req-1", at: float | None = None
) -> dict:
    ts = str(int(time.time() if at is None else at))
    message = "\n".join([request_id, "user-9", ts, hashlib.sha256(body).hexdigest()]).encode()
    return {
        "x-fal-webhook-request-id": request_id,
        "x-fal-webhook-user-id": "user-9",
        "x-fal-webhook-timestamp": ts,
        "x-fal-webhook-signature": key.sign(message).hex(),
    }


@pytest.fixture
def jwks_server() -> Iterator[tuple[str, list[Ed25519PrivateKey], Counter[str]]]:
    keys = [Ed25519PrivateKey.generate()]
    fetches: Counter[str] = Counter()

    def build(_: str) -> FastAPI:
        app = FastAPI()

        @app.get("/.well-known/jwks.json")
        async def jwks() -> JSONResponse:
            fetches["jwks"] += 1
            return JSONResponse({"keys": [jwk(k) for k in keys]})

        return app

    with serve(build) as url:
        yield f"{url}/.well-known/jwks.json", keys, fetches


async def test_a_genuine_delivery_verifies_and_forged_or_stale_ones_do_not(jwks_server):
    url, keys, fetches = jwks_server
    verifier = WebhookVerifier(url, refetch_interval=0.0)
    body = json.dumps({"request_id": "req-1", "status": "OK", "payload": {"images": []}}).encode()
    genuine = signed(keys[0], body)
    delivery = await verifier.verify(genuine, body)
    assert (delivery.request_id, delivery.user_id) == ("req-1", "user-9")

    refusals = {
        "forged key": (signed(Ed25519PrivateKey.generate(), body), body),
        "tampered body": (genuine, body.replace(b"OK", b"ER")),
        "other request": ({**genuine, "x-fal-webhook-request-id": "req-2"}, body),
        "stale": (signed(keys[0], body, at=time.time() - 310), body),
        "from the future": (signed(keys[0], body, at=time.time() + 310), body),
        "missing header": ({k: v for k, v in genuine.items() if "user-id" not in k}, body),
        "not hex": ({**genuine, "x-fal-webhook-signature": "zz"}, body),
    }
    reasons = {}
    for name, (headers, raw) in refusals.items():
        with pytest.raises(InvalidWebhook) as refused:
            await verifier.verify(headers, raw)
        reasons[name] = str(refused.value)
    assert "stale" in reasons["stale"] and "stale" in reasons["from the future"]
    assert "x-fal-webhook-user-id" in reasons["missing header"]
    assert "does not verify" in reasons["forged key"]
    assert fetches["jwks"] >= 1


async def test_a_rotated_key_is_fetched_again_but_forgeries_do_not_hammer_the_jwks(jwks_server):
    url, keys, fetches = jwks_server
    verifier = WebhookVerifier(url, refetch_interval=3600.0)
    body = b'{"request_id": "req-1", "status": "OK", "payload": null}'
    await verifier.verify(signed(keys[0], body), body)
    assert fetches["jwks"] == 1
    for _ in range(5):
        with pytest.raises(InvalidWebhook):
            await verifier.verify(signed(Ed25519PrivateKey.generate(), body), body)
    assert fetches["jwks"] == 1  # fetched too recently to ask again

    rotating = WebhookVerifier(url, refetch_interval=0.0)
    await rotating.verify(signed(keys[0], body), body)
    keys[:] = [Ed25519PrivateKey.generate()]  # fal rotates its key
    before = fetches["jwks"]
    delivery = await rotating.verify(signed(keys[0], body), body)
    assert delivery.request_id == "req-1" and fetches["jwks"] == before + 1


def test_the_tolerance_must_be_shorter_than_the_duplicate_window():
    with pytest.raises(ValueError, match="duplicate window"):
        WebhookVerifier("http://127.0.0.1:1/jwks", tolerance=3600)


# --- the poller after the deadline --------------------------------------------------------------


async def poll_until(bus: Any, fal: FalClient, settings: Any, task_id: str, token: str) -> None:
    """Run a poller until the task has an event of kind ``token``."""

    async def follow(event: FluxEvent, msg: Any) -> None:
        assert isinstance(event, TaskSubmitted)
        await on_submitted(event, msg, bus=bus, fal=fal, settings=settings)

    stop = asyncio.Event()
    runner = asyncio.create_task(Consumer(durable="poller", token="submitted").serve(bus, follow, stop))
    await has_event(bus, task_id, token)
    stop.set()
    await runner


async def test_a_poller_back_after_the_deadline_collects_a_job_fal_finished(bus, settings, fast):
    async with FalClient(fast.public_url, TEST_API_KEY) as fal:
        submitted = await submit_directly(bus, fal, "late1")

        async def finished_at_fal() -> bool:
            return (await fal.status(submitted.data.status_url)).status == "COMPLETED"

        deadline = time.monotonic() + 15
        while not await finished_at_fal():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        settings.task_timeout_seconds = 0.01  # long past by the time a poller comes back
        await poll_until(bus, fal, settings, "late1", "completed")
    assert await types_of(bus, "late1") == ["task.requested", "task.submitted", "task.completed"]


async def test_a_poller_back_after_the_deadline_fails_and_cancels_an_unfinished_job(bus, settings, parked):
    settings.task_timeout_seconds = 0.01
    async with FalClient(parked.public_url, TEST_API_KEY) as fal:
        submitted = await submit_directly(bus, fal, "late2")
        await poll_until(bus, fal, settings, "late2", "failed")
        status = await fal.status(submitted.data.status_url)
    failure = await bus.last_event("late2", "failed")
    assert isinstance(failure, TaskFailed) and failure.data.stage == "timeout"
    assert status.error_type == "request_cancelled"


# --- a stop during a submit ---------------------------------------------------------------------


class GatedTransport(httpx.AsyncBaseTransport):
    """Real HTTP, but submits wait at the gate (a slow network between us and fal)."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            self.waiting.set()
            await self.gate.wait()
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_one_submit_is_bounded_below_the_stop_grace_and_the_ack_wait(settings):
    for failover in (2.0, 30.0, 300.0):
        settings.failover_seconds = failover
        assert submit_budget(settings) < SUBMIT_GRACE
        assert submit_budget(settings) < submitter_consumer(settings, None).ack_wait  # type: ignore[arg-type]


async def test_a_stop_during_a_submit_lets_it_finish_and_makes_no_second_job(bus, settings, fast):
    settings.failover_seconds = 3.0
    transport = GatedTransport()
    fal = CountingFal(fast.public_url, TEST_API_KEY, transport=transport)
    await bus.publish(requested("stop1"))
    stop = asyncio.Event()
    consumer = submitter_consumer(settings, fal)
    first = asyncio.create_task(serve_submitter(bus, fal, settings, stop, consumer=consumer))
    await asyncio.wait_for(transport.waiting.wait(), 15)
    stop.set()  # the service is told to stop while its submit is on the wire

    async def stopped_fetching() -> bool:
        info = await bus.js.consumer_info(bus.stream, consumer.durable)
        return consumer._stopping.is_set() and not info.num_waiting

    await wait_for(stopped_fetching)
    assert not first.done()  # the submit in flight keeps its grace
    transport.gate.set()
    await first
    assert (await bus.last_event("stop1", "submitted")) is not None

    second_stop = asyncio.Event()
    second = asyncio.create_task(serve_submitter(bus, fal, settings, second_stop))
    await submitter_holds(bus, 1, 0)  # the redelivered request is held again, not resubmitted
    await bus.publish(TaskFailed.caused_by(requested("stop1"), {"stage": "result", "error": "done"}))
    await submitter_holds(bus, 0, 0)
    second_stop.set()
    await second
    await fal.aclose()
    assert fal.submits == 1
    assert await types_of(bus, "stop1") == ["task.requested", "task.submitted", "task.failed"]


async def test_a_submit_that_outlives_its_budget_is_given_up_before_a_redelivery(bus, settings, fast):
    settings.failover_seconds = 1.0  # budget 0.8 s
    transport = GatedTransport()  # never opened: fal never answers
    fal = CountingFal(fast.public_url, TEST_API_KEY, transport=transport)
    await bus.publish(requested("slow1"))
    stop = asyncio.Event()
    deliveries: list[int] = []
    runner = asyncio.create_task(serve_submitter(bus, fal, settings, stop, deliveries))

    async def retried() -> bool:
        return len(deliveries) >= 2

    await wait_for(retried)
    stop.set()
    await runner
    await fal.aclose()
    assert await bus.last_event("slow1", "submitted") is None


async def test_the_uploader_refuses_a_result_off_fal_hosts_and_stores_nothing(bus, settings, fast, recorders):
    (elsewhere, recorder), _ = recorders
    settings.fal_base_url = fast.public_url
    completed = TaskCompleted(
        task_id="foreign1",
        user_id="alice",
        data=TaskCompletedData(request_id="r", images=(ProviderImage(url=f"{elsewhere}/latest/meta-data"),)),
    )
    await bus.publish(requested("foreign1"))
    await bus.publish(completed)

    async with result_client(settings, follow_redirects=True) as http:

        async def store(event: FluxEvent, msg: Any) -> None:
            assert isinstance(event, TaskCompleted)
            await on_completed(
                event,
                msg,
                bus=bus,
                storage=make_storage(settings),
                http=http,
                settings=settings,
                max_deliver=3,
            )

        stop = asyncio.Event()
        runner = asyncio.create_task(Consumer(durable="uploader", token="completed").serve(bus, store, stop))
        await has_event(bus, "foreign1", "storage_failed")
        stop.set()
        await runner
    failure = await bus.last_event("foreign1", "storage_failed")
    assert isinstance(failure, StorageFailed) and "not one of fal's result hosts" in failure.data.error
    assert sum(recorder.hits.values()) == 0
    assert not settings.storage_dir.exists() or not any(settings.storage_dir.iterdir())
