"""FalClient against the simulator and against a scripted server, all over real HTTP."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from services.common.fal import FalClient, FalError, QueueHandle, QueueStatus
from services.simulator.app import SimulatorSettings
from tests.simulator_server import TEST_API_KEY, serve

SECRET_KEY = "fal-secret-id:0f1e2d3c4b5a69788796a5b4c3d2e1f0"
NGINX_502 = "<html><head><title>502 Bad Gateway</title></head><body><center>nginx</center></body></html>"
WAIT_LIMIT_SECONDS = 15.0


@dataclass
class Reply:
    status_code: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    text: str | None = None


@dataclass
class Script:
    """Replies per path, served in order; the last one repeats. `{authorization}` in a text or
    detail string is replaced by the Authorization header the server received."""

    replies: dict[str, list[Reply]] = field(default_factory=dict)
    hits: Counter[str] = field(default_factory=Counter)

    def path(self, *replies: Reply) -> str:
        name = f"scripted/{uuid.uuid4().hex}"
        self.replies[name] = list(replies)
        return name


@pytest.fixture(scope="module")
def scripted() -> Iterator[tuple[str, Script]]:
    script = Script()
    app = FastAPI()

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT"])
    async def reply(path: str, request: Request) -> Response:
        script.hits[path] += 1
        plan = script.replies.get(path)
        if not plan:
            return JSONResponse({"detail": "no script"}, status_code=404)
        item = plan.pop(0) if len(plan) > 1 else plan[0]
        authorization = request.headers.get("authorization", "")
        if item.text is not None:
            return PlainTextResponse(
                item.text.replace("{authorization}", authorization), item.status_code, item.headers
            )
        body = item.body
        if isinstance(body, dict) and isinstance(body.get("detail"), str):
            body = {**body, "detail": body["detail"].replace("{authorization}", authorization)}
        return JSONResponse(body, item.status_code, item.headers)

    with serve(lambda _: app) as base_url:
        yield base_url, script


def quick_client(base_url: str, api_key: str = TEST_API_KEY, **kwargs: Any) -> FalClient:
    options: dict[str, Any] = {"max_attempts": 4, "backoff_initial": 0.001, "backoff_max": 0.01} | kwargs
    return FalClient(base_url, api_key, **options)


async def wait_completed(fal: FalClient, handle: QueueHandle) -> list[QueueStatus]:
    seen: list[QueueStatus] = []
    deadline = time.monotonic() + WAIT_LIMIT_SECONDS
    while time.monotonic() < deadline:
        seen.append(await fal.status(handle))
        if seen[-1].status == "COMPLETED":
            return seen
        await asyncio.sleep(0.02)
    raise AssertionError("request never completed")


# --- the protocol, against the simulator ---------------------------------------------------------


async def test_submit_follow_and_fetch_the_result(fast: SimulatorSettings) -> None:
    async with quick_client(fast.public_url) as fal:
        handle = await fal.submit("fal-ai/flux-1/schnell", {"prompt": "a comet", "seed": 11})
        seen = await wait_completed(fal, handle)
        result = await fal.result(handle.response_url)
    assert handle.status_url == f"{fast.public_url}/fal-ai/flux-1/requests/{handle.request_id}/status"
    assert isinstance(handle.queue_position, int)
    order = {"IN_QUEUE": 0, "IN_PROGRESS": 1, "COMPLETED": 2}
    assert [order[s.status] for s in seen] == sorted(order[s.status] for s in seen)
    completed = seen[-1]
    assert completed.error is None and completed.error_type is None
    assert isinstance(completed.inference_time, float)
    assert result["seed"] == 11
    assert result["images"][0]["width"] == 1024


async def test_urls_come_from_submit_so_subpath_models_work(fast: SimulatorSettings) -> None:
    async with quick_client(fast.public_url) as fal:
        handle = await fal.submit("fal-ai/flux-pro/kontext/max/text-to-image", {"prompt": "a bridge"})
        await wait_completed(fal, handle)
        status = await fal.status(handle.status_url)
        result = await fal.result(handle.response_url)
    assert handle.response_url == f"{fast.public_url}/fal-ai/flux-pro/requests/{handle.request_id}"
    assert status.status == "COMPLETED"
    assert (result["images"][0]["width"], result["images"][0]["height"]) == (1024, 1024)


async def test_a_validation_error_carries_fals_message_and_type(fast: SimulatorSettings) -> None:
    async with quick_client(fast.public_url) as fal:
        handle = await fal.submit("fal-ai/flux-1/schnell", {"prompt": "x", "num_inference_steps": 28})
        await wait_completed(fal, handle)
        with pytest.raises(FalError) as raised:
            await fal.result(handle.response_url)
        multi = await fal.submit("fal-ai/flux-1/dev", {"num_images": 0, "output_format": "gif"})
        await wait_completed(fal, multi)
        with pytest.raises(FalError) as raised_multi:
            await fal.result(multi.response_url)
    error = raised.value
    assert error.message == "num_inference_steps: Input should be less than or equal to 12"
    assert str(error) == error.message
    assert (error.status_code, error.error_type, error.retryable) == (422, "less_than_equal", False)
    assert raised_multi.value.message == (
        "prompt: Field required; num_images: Input should be greater than or equal to 1; "
        "output_format: Input should be 'jpeg' or 'png'"
    )
    assert raised_multi.value.error_type == "missing"


async def test_a_blocked_prompt_is_a_content_policy_violation(fast: SimulatorSettings) -> None:
    async with quick_client(fast.public_url) as fal:
        handle = await fal.submit("fal-ai/flux-pro/kontext/text-to-image", {"prompt": "forbidden things"})
        await wait_completed(fal, handle)
        with pytest.raises(FalError) as raised:
            await fal.result(handle.response_url)
    assert raised.value.error_type == "content_policy_violation"
    assert raised.value.message.startswith("prompt: The content could not be processed")
    assert not raised.value.retryable


async def test_cancel_reports_fals_answer_and_the_request_ends(parked: SimulatorSettings) -> None:
    async with quick_client(parked.public_url) as fal:
        handle = await fal.submit("fal-ai/flux-1/dev", {"prompt": "x"})
        queued = await fal.status(handle)
        with pytest.raises(FalError) as not_ready:
            await fal.result(handle.response_url)
        first = await fal.cancel(handle.cancel_url)
        second = await fal.cancel(handle.cancel_url)
        ended = await fal.status(handle)
        with pytest.raises(FalError) as cancelled:
            await fal.result(handle.response_url)
        unknown = await fal.cancel(handle.cancel_url.replace(handle.request_id, str(uuid.uuid4())))
    assert queued.status == "IN_QUEUE" and isinstance(queued.queue_position, int)
    assert (not_ready.value.status_code, not_ready.value.retryable) == (400, False)
    assert (first, second, unknown) == ("CANCELLATION_REQUESTED", "ALREADY_COMPLETED", "NOT_FOUND")
    assert ended.status == "COMPLETED"
    assert ended.error_type == "request_cancelled" and ended.error
    assert (cancelled.value.status_code, cancelled.value.error_type) == (400, "request_cancelled")


async def test_an_unknown_model_is_a_404_without_retries(fast: SimulatorSettings) -> None:
    async with quick_client(fast.public_url) as fal:
        with pytest.raises(FalError) as raised:
            await fal.submit("fal-ai/flux-9/ultra", {"prompt": "x"})
    assert (raised.value.status_code, raised.value.retryable) == (404, False)
    assert "not found" in raised.value.message


async def test_model_ids_must_have_an_owner_and_an_alias(fast: SimulatorSettings) -> None:
    async with quick_client(fast.public_url) as fal:
        for bad in ("flux", "", "fal-ai/flux?x=1"):
            with pytest.raises(ValueError):
                await fal.submit(bad, {})


# --- retries, against a scripted server ----------------------------------------------------------


@pytest.mark.parametrize("code", [408, 409, 429, 500, 502, 503, 504])
async def test_transient_statuses_are_retried(scripted: tuple[str, Script], code: int) -> None:
    base_url, script = scripted
    path = script.path(
        Reply(code, {"detail": "try later"}),
        Reply(code, {"detail": "again"}),
        Reply(200, {"status": "COMPLETED"}),
    )
    async with quick_client(base_url) as fal:
        assert (await fal.status(f"{base_url}/{path}")).status == "COMPLETED"
    assert script.hits[path] == 3


@pytest.mark.parametrize(
    "reply",
    [
        Reply(408, {"detail": "try later"}),
        Reply(409, {"detail": "try later"}),
        Reply(429, {"detail": "try later"}),
        Reply(500, text=""),
        Reply(502, text=NGINX_502),
        Reply(503, text="<html>503 Service Temporarily Unavailable nginx</html>"),
        Reply(504, text="<html>504 Gateway Time-out nginx</html>"),
    ],
)
async def test_result_retries_transient_and_ingress_answers(
    scripted: tuple[str, Script], reply: Reply
) -> None:
    base_url, script = scripted
    path = script.path(reply, reply, Reply(200, {"ok": 1}))
    async with quick_client(base_url) as fal:
        assert await fal.result(f"{base_url}/{path}") == {"ok": 1}
    assert script.hits[path] == 3


@pytest.mark.parametrize(
    ("code", "message", "error_type"),
    [
        (500, "Internal server error", "internal_server_error"),
        (504, "Generation timed out", "generation_timeout"),
    ],
)
async def test_a_models_5xx_result_is_final(
    scripted: tuple[str, Script], code: int, message: str, error_type: str
) -> None:
    base_url, script = scripted
    path = script.path(
        Reply(code, {"detail": message, "error_type": error_type}, {"x-fal-request-id": "req-1"}),
        Reply(200, {"ok": 1}),
    )
    async with quick_client(base_url) as fal:
        with pytest.raises(FalError) as raised:
            await fal.result(f"{base_url}/{path}")
    assert script.hits[path] == 1
    error = raised.value
    assert (error.status_code, error.retryable, error.error_type) == (code, False, error_type)
    assert error.message == message


@pytest.mark.parametrize(
    "reply",
    [
        Reply(502, text=NGINX_502, headers={"x-fal-request-id": "req-1"}),
        Reply(503, {"detail": "Runner disconnected"}),
        Reply(500, {"error_type": "internal_server_error"}),
    ],
)
async def test_any_sign_of_the_request_makes_a_result_5xx_final(
    scripted: tuple[str, Script], reply: Reply
) -> None:
    base_url, script = scripted
    path = script.path(reply, Reply(200, {"ok": 1}))
    async with quick_client(base_url) as fal:
        with pytest.raises(FalError) as raised:
            await fal.result(f"{base_url}/{path}")
    assert script.hits[path] == 1
    assert (raised.value.status_code, raised.value.retryable) == (reply.status_code, False)


async def test_an_ingress_502_on_result_is_retried_until_max_attempts(scripted: tuple[str, Script]) -> None:
    base_url, script = scripted
    path = script.path(Reply(502, text=NGINX_502))
    async with quick_client(base_url, max_attempts=3) as fal:
        with pytest.raises(FalError) as raised:
            await fal.result(f"{base_url}/{path}")
    assert script.hits[path] == 3
    assert (raised.value.status_code, raised.value.retryable) == (502, True)
    # the proxy's HTML page is not a message for a user: what happened, in one line
    assert raised.value.message == "HTTP 502 Bad Gateway from fal's gateway"


async def test_status_still_retries_a_5xx_with_fals_detail(scripted: tuple[str, Script]) -> None:
    base_url, script = scripted
    path = script.path(
        Reply(
            500,
            {"detail": "Internal server error", "error_type": "internal_server_error"},
            {"x-fal-request-id": "req-1"},
        )
    )
    async with quick_client(base_url, max_attempts=3) as fal:
        with pytest.raises(FalError) as raised:
            await fal.status(f"{base_url}/{path}")
    assert script.hits[path] == 3
    error = raised.value
    assert (error.status_code, error.retryable, error.error_type) == (500, True, "internal_server_error")
    assert error.message == "Internal server error"


async def test_retries_stop_after_max_attempts(scripted: tuple[str, Script]) -> None:
    base_url, script = scripted
    path = script.path(
        Reply(503, {"detail": "Runner disconnected"}, {"X-Fal-Error-Type": "runner_disconnected"})
    )
    async with quick_client(base_url, max_attempts=3) as fal:
        with pytest.raises(FalError) as raised:
            await fal.status(f"{base_url}/{path}")
    assert script.hits[path] == 3
    error = raised.value
    assert (error.status_code, error.retryable, error.error_type) == (503, True, "runner_disconnected")
    assert error.message == "Runner disconnected"


async def test_a_429_waits_for_retry_after_and_submit_is_retried(scripted: tuple[str, Script]) -> None:
    base_url, script = scripted
    handle_body = {
        "status": "IN_QUEUE",
        "request_id": "r-1",
        "response_url": "u/r",
        "status_url": "u/s",
        "cancel_url": "u/c",
        "queue_position": 3,
    }
    path = script.path(Reply(429, {"detail": "slow down"}, {"Retry-After": "0"}), Reply(200, handle_body))
    async with quick_client(base_url) as fal:
        handle = await fal.submit(path, {"prompt": "x"})
    assert handle == QueueHandle("r-1", "u/s", "u/r", "u/c", 3)
    assert script.hits[path] == 2


@pytest.mark.parametrize(
    ("reply", "error_type"),
    [
        (Reply(504, {"detail": "Request timed out"}, {"X-Fal-Request-Timeout-Type": "user"}), None),
        (
            Reply(
                500, {"detail": "boom", "error_type": "internal_server_error"}, {"X-Fal-Retryable": "false"}
            ),
            None,
        ),
        (Reply(422, {"detail": [{"loc": ["body", "seed"], "msg": "bad", "type": "int_type"}]}), "int_type"),
        (Reply(401, {"detail": "Invalid API key"}), None),
        (Reply(403, {"detail": "User is locked. Reason: Exhausted balance."}), None),
        (Reply(400, {"detail": "Request is still in progress"}), None),
    ],
)
async def test_final_answers_are_not_retried(
    scripted: tuple[str, Script], reply: Reply, error_type: str | None
) -> None:
    base_url, script = scripted
    path = script.path(reply)
    async with quick_client(base_url) as fal:
        with pytest.raises(FalError) as raised:
            await fal.result(f"{base_url}/{path}")
    assert script.hits[path] == 1
    assert raised.value.status_code == reply.status_code
    assert raised.value.retryable is False
    if error_type is not None:
        assert raised.value.error_type == error_type


async def test_transport_errors_are_retried_then_reported(scripted: tuple[str, Script]) -> None:
    attempts = 0

    class Counting(httpx.AsyncBaseTransport):
        def __init__(self) -> None:
            self.inner = httpx.AsyncHTTPTransport()

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            nonlocal attempts
            attempts += 1
            return await self.inner.handle_async_request(request)

        async def aclose(self) -> None:
            await self.inner.aclose()

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead_base = f"http://127.0.0.1:{closed.getsockname()[1]}"
        dead_url = f"{dead_base}/fal-ai/flux-1/requests/x/status"
        async with quick_client(dead_base, transport=Counting(), max_attempts=3) as fal:
            with pytest.raises(FalError) as raised:
                await fal.status(dead_url)
    assert attempts == 3
    assert raised.value.status_code is None
    assert raised.value.retryable is True
    assert "ConnectError" in raised.value.message


# --- fal's error shapes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "message", "error_type"),
    [
        (
            Reply(
                422,
                {
                    "detail": [
                        {"loc": ["body", "image_size", "width"], "msg": "Input should be ≥ 16", "type": "a"},
                        {"loc": ["body"], "msg": "Image load error", "type": "image_load_error"},
                    ]
                },
            ),
            "image_size.width: Input should be ≥ 16; Image load error",
            "a",
        ),
        (
            Reply(
                422,
                {"detail": "Request timed out", "error_type": "request_timeout"},
                {"X-Fal-Error-Type": "x"},
            ),
            "Request timed out",
            "request_timeout",
        ),
        (
            Reply(404, {"detail": "Application not found"}, {"X-Fal-Error-Type": "app_missing"}),
            None,
            "app_missing",
        ),
        (Reply(418, text="<html>nginx teapot</html>"), "HTTP 418 I'm a Teapot from fal's gateway", None),
        (Reply(418, text=""), "HTTP 418", None),
    ],
)
async def test_error_messages_and_types_follow_fal(
    scripted: tuple[str, Script], reply: Reply, message: str | None, error_type: str | None
) -> None:
    base_url, script = scripted
    path = script.path(reply)
    async with quick_client(base_url) as fal:
        with pytest.raises(FalError) as raised:
            await fal.result(f"{base_url}/{path}")
    assert raised.value.message == (message if message is not None else reply.body["detail"])
    assert raised.value.error_type == error_type


async def test_an_unknown_status_is_an_error(scripted: tuple[str, Script]) -> None:
    base_url, script = scripted
    path = script.path(Reply(200, {"status": "EXPLODED"}))
    async with quick_client(base_url) as fal:
        with pytest.raises(FalError, match="unknown status"):
            await fal.status(f"{base_url}/{path}")


# --- the API key stays secret --------------------------------------------------------------------


def assert_secret_absent(*texts: str) -> None:
    for text in texts:
        assert SECRET_KEY not in text
        assert SECRET_KEY.split(":")[1] not in text


async def test_the_key_never_appears_in_errors_reprs_or_logs(
    fast: SimulatorSettings, scripted: tuple[str, Script], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    base_url, script = scripted
    echoing = script.path(
        Reply(503, text="<html>nginx: overloaded, your header was {authorization}</html>"),
        Reply(400, {"detail": "bad credentials {authorization}"}),
    )
    echoing_text = script.path(Reply(401, text="denied for {authorization}"))
    errors: list[FalError] = []
    fal = quick_client(fast.public_url, SECRET_KEY)
    scripted_fal = quick_client(base_url, SECRET_KEY)  # the key only goes to its own fal host
    try:
        with pytest.raises(FalError) as unauthorized:
            await fal.submit("fal-ai/flux-1/dev", {"prompt": "x"})
        errors.append(unauthorized.value)
        for url in (f"{base_url}/{echoing}", f"{base_url}/{echoing_text}"):
            with pytest.raises(FalError) as echoed:
                await scripted_fal.result(url)
            errors.append(echoed.value)
        client_repr = repr(fal)
    finally:
        await fal.aclose()
        await scripted_fal.aclose()

    assert unauthorized.value.status_code == 401
    assert errors[1].message == "bad credentials Key [redacted]"
    assert errors[2].message == "denied for Key [redacted]"
    assert script.hits[echoing] == 2
    for error in errors:
        assert_secret_absent(str(error), repr(error), error.message, *map(str, error.args))
    assert_secret_absent(client_repr, caplog.text, *(record.getMessage() for record in caplog.records))
    assert any("retrying" in record.getMessage() for record in caplog.records)


def test_a_key_that_cannot_be_a_header_value_is_refused_without_echoing_it() -> None:
    with pytest.raises(ValueError) as raised:
        FalClient("http://127.0.0.1:1", "bad key\nwith newline")
    assert "bad key" not in str(raised.value)
