"""The gateway never answers a bare 500, and refuses oversized bodies before reading them."""

from __future__ import annotations

import json
import logging
import tracemalloc
from collections.abc import AsyncIterator

import httpx
import pytest

from schemas.events import TaskSubmitted, TaskSubmittedData
from services.common.auth import issue_token
from services.common.embedded import free_port
from services.gateway.app import create_app

MiB = 1024 * 1024


async def serve(settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)

    @app.get("/api/flux/explode", include_in_schema=False)
    async def explode() -> None:
        raise RuntimeError(
            "cannot open /srv/fluxpipe/secret.conf on db.internal:5432 (https://signed?sig=abc)"
        )

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            yield client


@pytest.fixture
async def client(settings, engine, bus) -> AsyncIterator[httpx.AsyncClient]:
    async for client in serve(settings):
        yield client


@pytest.fixture
async def without_postgres(settings, bus) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway with PostgreSQL down: nothing listens where the database should be."""
    down = settings.model_copy(update={"database_url": f"postgresql://postgres@127.0.0.1:{free_port()}/gone"})
    async for client in serve(down):
        yield client


@pytest.fixture
def alice(settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_token(settings, 'alice')}"}


@pytest.mark.parametrize(
    "body",
    [{"prompt": "\ud800"}, {"prompt": "a \ud800 b", "num_images": 9}],
    ids=["alone", "with another error"],
)
async def test_a_lone_surrogate_in_the_prompt_is_a_422(client, alice, bus, body):
    raw = json.dumps(body).encode()  # ASCII JSON with the \ud800 escape, as a client sends it
    r = await client.post(
        "/api/flux/text-to-image", content=raw, headers={**alice, "Content-Type": "application/json"}
    )
    assert r.status_code == 422, r.text
    assert r.json()["message"].startswith("prompt: ")
    assert [m async for m in bus.iter_raw(bus.task_subject())] == []


async def test_an_absurd_page_number_is_a_422(client, alice):
    r = await client.get(f"/api/flux/history?page={10**20}", headers=alice)
    assert r.status_code == 422 and r.json()["message"].startswith("query.page: ")
    r = await client.get("/api/flux/history?page=100000&limit=100", headers=alice)
    assert r.status_code == 200 and r.json()["items"] == []


async def test_an_unexpected_error_is_json_naming_no_internals_and_logged(client, alice, caplog):
    with caplog.at_level(logging.ERROR, logger="services.gateway.guards"):
        r = await client.get("/api/flux/explode", headers=alice)
    assert r.status_code == 500
    message = r.json()["message"]
    assert message.startswith("internal error (reference ")
    for leak in ("/srv", "db.internal", "sig=", "RuntimeError"):
        assert leak not in r.text
    reference = message.split("reference ")[1].split(")")[0]
    logged = [rec for rec in caplog.records if reference in rec.getMessage()]
    assert logged and logged[0].exc_info is not None  # with its traceback, server-side only


async def test_with_postgres_down_a_task_is_answered_from_the_event_log(
    without_postgres, alice, bus, settings
):
    r = await without_postgres.post("/api/flux/text-to-image", json={"prompt": "fox"}, headers=alice)
    assert r.status_code == 202
    task_id = r.json()["task_id"]
    requested = await bus.last_event(task_id, "requested")
    assert requested is not None
    await bus.publish(
        TaskSubmitted.caused_by(
            requested,
            TaskSubmittedData(
                request_id="req-1",
                status_url="http://f/s",
                response_url="http://f/r",
                cancel_url="http://f/c",
            ),
        )
    )
    r = await without_postgres.get(f"/api/flux/task/{task_id}", headers=alice)
    assert r.status_code == 200, r.text
    assert (
        r.json()["status"] == "IN_QUEUE" and r.json()["request_id"] == "req-1" and r.json()["prompt"] == "fox"
    )
    bob = {"Authorization": f"Bearer {issue_token(settings, 'bob')}"}
    r = await without_postgres.get(f"/api/flux/task/{task_id}", headers=bob)
    assert r.status_code == 404 and r.json()["message"] == f"task {task_id} not found"


async def test_with_postgres_down_history_is_a_503_with_retry_after(without_postgres, alice):
    r = await without_postgres.get("/api/flux/history", headers=alice)
    assert r.status_code == 503
    assert r.headers["retry-after"] == "5" and "database is unavailable" in r.json()["message"]
    assert "127.0.0.1" not in r.text


class Endless:
    """A request body of ``chunks`` MiB, produced lazily; counts how much was pulled."""

    def __init__(self, chunks: int) -> None:
        self.chunks, self.pulled = chunks, 0
        self.chunk = b"x" * MiB

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.chunks):
            self.pulled += 1
            yield self.chunk


async def test_a_1gb_body_without_a_token_is_refused_before_it_is_read(client):
    body = Endless(1024)
    r = await client.post(
        "/api/flux/text-to-image",
        content=body,
        headers={"Content-Length": str(1024 * MiB), "Content-Type": "application/json"},
    )
    assert r.status_code == 413 and "larger than the 1048576 bytes" in r.json()["message"]
    assert body.pulled <= 1  # not read: refused on its Content-Length


async def test_a_1gb_chunked_body_is_cut_off_at_the_limit(client):
    body = Endless(1024)
    tracemalloc.start()
    try:
        r = await client.post(
            "/api/flux/text-to-image", content=body, headers={"Content-Type": "application/json"}
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * MiB  # a few chunks at most were ever held, never the gigabyte
    assert r.status_code == 413 and "larger than" in r.json()["message"]
    assert body.pulled <= 3  # read only up to the 1 MiB limit, never the whole gigabyte


async def test_upload_routes_have_their_own_larger_limit(client, alice, settings):
    assert settings.body_limit_prefixes == {"/api/flux/upload-image": 11 * MiB, "/v1/images/edits": 44 * MiB}
    r = await client.post("/api/flux/upload-image", content=b"x" * (2 * MiB), headers=alice)
    assert r.status_code != 413  # within the upload limit (the route itself is another part's)
    too_big = {**alice, "Content-Length": str(12 * MiB)}
    r = await client.post("/api/flux/upload-image", content=Endless(12), headers=too_big)
    assert r.status_code == 413 and "11534336 bytes" in r.json()["message"]
    r = await client.post("/api/flux/text-to-image", content=b"x" * (2 * MiB), headers=alice)
    assert r.status_code == 413
