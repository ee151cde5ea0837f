"""The fal simulator speaks fal's queue protocol (shared/fal-protocol.md) over real HTTP."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import fal_client
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi import FastAPI, Request
from PIL import Image

from services.simulator.app import SimulatorSettings
from tests.simulator_server import TEST_API_KEY, running_simulator, serve

AUTH = {"Authorization": f"Key {TEST_API_KEY}"}
ORDER = {"IN_QUEUE": 0, "IN_PROGRESS": 1, "COMPLETED": 2}
WAIT_LIMIT_SECONDS = 15.0


@pytest.fixture(scope="module")
def running() -> Iterator[SimulatorSettings]:
    """Requests are IN_PROGRESS at once and stay there for the whole test."""
    with running_simulator(queue_seconds=0, run_seconds=600, stream_ping_seconds=0.05) as settings:
        yield settings


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(headers=AUTH, timeout=10)


async def submit(
    http: httpx.AsyncClient, sim: SimulatorSettings, model: str, args: dict, **params: str
) -> dict:
    response = await http.post(f"{sim.public_url}/{model}", json=args, params=params)
    assert response.status_code == 200, response.text
    return response.json()


async def wait_completed(http: httpx.AsyncClient, status_url: str, **params: str) -> list[httpx.Response]:
    """Poll until COMPLETED; returns every status response seen, the COMPLETED one last."""
    seen: list[httpx.Response] = []
    deadline = time.monotonic() + WAIT_LIMIT_SECONDS
    while time.monotonic() < deadline:
        response = await http.get(status_url, params=params)
        seen.append(response)
        if response.json()["status"] == "COMPLETED":
            return seen
        await asyncio.sleep(0.02)
    raise AssertionError("request never completed")


async def run_to_result(
    http: httpx.AsyncClient, sim: SimulatorSettings, model: str, args: dict
) -> tuple[dict, httpx.Response]:
    queued = await submit(http, sim, model, args)
    await wait_completed(http, queued["status_url"])
    return queued, await http.get(queued["response_url"])


async def fetch_image(url: str) -> tuple[bytes, Image.Image]:
    async with httpx.AsyncClient() as anonymous:
        response = await anonymous.get(url)
    assert response.status_code == 200
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return response.content, image


def png_data_uri(width: int, height: int, colour: tuple[int, int, int] = (200, 30, 30)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# --- submit and the URL rule -----------------------------------------------------------------------


async def test_submit_answers_with_the_full_queue_envelope(parked: SimulatorSettings) -> None:
    async with client() as http:
        response = await http.post(f"{parked.public_url}/fal-ai/flux-1/dev", json={"prompt": "a lighthouse"})
    assert response.status_code == 200
    body = response.json()
    request_id = body["request_id"]
    assert uuid.UUID(request_id).version == 4
    base = f"{parked.public_url}/fal-ai/flux-1/requests/{request_id}"
    assert body == {
        "status": "IN_QUEUE",
        "request_id": request_id,
        "response_url": base,
        "status_url": base + "/status",
        "cancel_url": base + "/cancel",
        "logs": None,
        "metrics": {},
        "queue_position": body["queue_position"],
    }
    assert isinstance(body["queue_position"], int) and body["queue_position"] >= 0
    assert response.headers["x-fal-request-id"] == request_id


async def test_urls_of_a_subpath_model_use_only_owner_and_alias(parked: SimulatorSettings) -> None:
    async with client() as http:
        body = await submit(
            http, parked, "fal-ai/flux-pro/kontext/max/multi", {"prompt": "x", "image_urls": []}
        )
        request_id = body["request_id"]
        assert body["status_url"] == f"{parked.public_url}/fal-ai/flux-pro/requests/{request_id}/status"
        assert (await http.get(body["status_url"])).status_code == 202


async def test_status_result_and_cancel_under_the_full_model_path_are_not_found(
    parked: SimulatorSettings,
) -> None:
    async with client() as http:
        body = await submit(http, parked, "fal-ai/flux-pro/kontext/max", {"prompt": "x", "image_url": "y"})
        request_id = body["request_id"]
        for wrong_app in ("fal-ai/flux-pro/kontext/max", "fal-ai/flux-1", "fal-ai/flux-pro/kontext"):
            base = f"{parked.public_url}/{wrong_app}/requests/{request_id}"
            assert (await http.get(base + "/status")).status_code == 404
            assert (await http.get(base + "/status/stream")).status_code == 404
            assert (await http.get(base)).status_code == 404
            assert (await http.put(base + "/cancel")).status_code == 404
        status = await http.get(body["status_url"])
    assert status.status_code == 202
    assert status.json()["status"] == "IN_QUEUE"


async def test_unknown_model_and_unknown_request_are_not_found(parked: SimulatorSettings) -> None:
    async with client() as http:
        for model in ("fal-ai/flux-1/pro", "fal-ai/flux-1", "fal-ai", "workflows/fal-ai/flux-1/dev"):
            response = await http.post(f"{parked.public_url}/{model}", json={"prompt": "x"})
            assert response.status_code == 404
            assert response.json()["detail"] == f"Application '{model}' not found"
        base = f"{parked.public_url}/fal-ai/flux-1/requests/{uuid.uuid4()}"
        assert (await http.get(base + "/status")).status_code == 404
        assert (await http.get(base)).status_code == 404
        cancel = await http.put(base + "/cancel")
    assert cancel.status_code == 404
    assert cancel.json()["status"] == "NOT_FOUND"


async def test_a_body_that_is_not_a_json_object_is_refused_at_submit(parked: SimulatorSettings) -> None:
    async with client() as http:
        response = await http.post(f"{parked.public_url}/fal-ai/flux-1/dev", content=b"[1, 2]")
    assert response.status_code == 422
    assert response.json()["detail"][0]["type"] == "model_attributes_type"


# --- auth --------------------------------------------------------------------------------------------


async def test_requests_without_the_right_key_are_unauthorized(parked: SimulatorSettings) -> None:
    async with client() as http:
        queued = await submit(http, parked, "fal-ai/flux-1/dev", {"prompt": "x"})
    url = f"{parked.public_url}/fal-ai/flux-1/dev"
    async with httpx.AsyncClient() as anonymous:
        attempts = [
            await anonymous.post(url, json={"prompt": "x"}),
            await anonymous.post(url, json={"prompt": "x"}, headers={"Authorization": "Key wrong"}),
            await anonymous.post(
                url, json={"prompt": "x"}, headers={"Authorization": f"Bearer {TEST_API_KEY}"}
            ),
            await anonymous.get(queued["status_url"], headers={"Authorization": "Key wrong"}),
            await anonymous.get(queued["response_url"]),
            await anonymous.put(queued["cancel_url"]),
        ]
    for response in attempts:
        assert response.status_code == 401
        assert isinstance(response.json()["detail"], str)
        assert TEST_API_KEY not in response.text


# --- lifecycle -----------------------------------------------------------------------------------


async def test_a_request_goes_through_the_queue_to_images_of_the_requested_size(
    fast: SimulatorSettings,
) -> None:
    args = {
        "prompt": "a red fox",
        "image_size": "square_hd",
        "output_format": "png",
        "num_images": 2,
        "seed": 7,
    }
    async with client() as http:
        queued = await submit(http, fast, "fal-ai/flux-1/dev", args)
        seen = await wait_completed(http, queued["status_url"], logs="1")
        result = await http.get(queued["response_url"])

    phases = [r.json()["status"] for r in seen]
    assert [ORDER[p] for p in phases] == sorted(ORDER[p] for p in phases)
    for response in seen[:-1]:
        assert response.status_code == 202
    completed = seen[-1]
    assert completed.status_code == 200
    assert isinstance(completed.json()["metrics"]["inference_time"], float)
    assert any("Running fal-ai/flux-1/dev" in entry["message"] for entry in completed.json()["logs"])

    assert result.status_code == 200
    assert result.headers["x-fal-request-id"] == queued["request_id"]
    body = result.json()
    assert body["seed"] == 7
    assert body["prompt"] == "a red fox"
    assert body["has_nsfw_concepts"] == [False, False]
    assert isinstance(body["timings"]["inference"], float)
    assert len(body["images"]) == 2
    for entry in body["images"]:
        assert entry["url"].startswith(f"{fast.public_url}/files/{queued['request_id']}/")
        assert (entry["width"], entry["height"], entry["content_type"]) == (1024, 1024, "image/png")
        _, image = await fetch_image(entry["url"])
        assert image.format == "PNG"
        assert image.size == (1024, 1024)


async def test_image_size_presets_and_custom_sizes(fast: SimulatorSettings) -> None:
    expected = {
        None: (1024, 768),
        "square_hd": (1024, 1024),
        "square": (512, 512),
        "portrait_4_3": (768, 1024),
        "portrait_16_9": (576, 1024),
        "landscape_4_3": (1024, 768),
        "landscape_16_9": (1024, 576),
    }

    async def size_of(image_size: Any) -> tuple[tuple[int, int], str | None]:
        args: dict[str, Any] = {"prompt": "a dune"}
        if image_size is not None:
            args["image_size"] = image_size
        async with client() as http:
            _, result = await run_to_result(http, fast, "fal-ai/flux-1/schnell", args)
        entry = result.json()["images"][0]
        _, image = await fetch_image(entry["url"])
        assert (entry["width"], entry["height"]) == image.size
        return image.size, image.format

    cases = [*expected, {"width": 640, "height": 320}]
    sizes = await asyncio.gather(*(size_of(case) for case in cases))
    for case, (size, image_format) in zip(cases, sizes, strict=True):
        assert image_format == "JPEG"
        assert size == (expected[case] if not isinstance(case, dict) else (640, 320))


async def test_kontext_sizes_follow_the_aspect_ratio_at_about_one_megapixel(fast: SimulatorSettings) -> None:
    async def size_of(aspect_ratio: str | None) -> tuple[int, int]:
        args = {"prompt": "a harbour"} | ({"aspect_ratio": aspect_ratio} if aspect_ratio else {})
        async with client() as http:
            _, result = await run_to_result(http, fast, "fal-ai/flux-pro/kontext/text-to-image", args)
        entry = result.json()["images"][0]
        return entry["width"], entry["height"]

    ratios = [None, "16:9", "9:16", "21:9", "4:3"]
    sizes = dict(zip(ratios, await asyncio.gather(*(size_of(r) for r in ratios)), strict=True))
    assert sizes[None] == (1024, 1024)
    for ratio in ratios[1:]:
        assert ratio is not None
        width, height = sizes[ratio]
        numerator, denominator = (int(part) for part in ratio.split(":"))
        assert abs(width / height - numerator / denominator) / (numerator / denominator) < 0.05
        assert 0.9e6 < width * height < 1.2e6


async def test_status_returns_logs_only_when_asked(running: SimulatorSettings) -> None:
    async with client() as http:
        queued = await submit(http, running, "fal-ai/flux-1/dev", {"prompt": "x"})
        answers = {
            flag: await http.get(queued["status_url"], params={"logs": flag}) for flag in ("1", "true")
        }
        quiet = {flag: await http.get(queued["status_url"], params={"logs": flag}) for flag in ("0", "false")}
        quiet["absent"] = await http.get(queued["status_url"])
    for response in [*answers.values(), *quiet.values()]:
        assert response.status_code == 202
        assert response.json()["status"] == "IN_PROGRESS"
        assert response.json()["metrics"] == {}
    for response in answers.values():
        [entry] = response.json()["logs"]
        assert set(entry) == {"message", "level", "source", "timestamp"}
    for response in quiet.values():
        assert response.json()["logs"] is None


async def test_queue_positions_count_only_requests_still_waiting(parked: SimulatorSettings) -> None:
    async with client() as http:
        first, second, third = [
            await submit(http, parked, "fal-ai/flux-1/schnell", {"prompt": "x"}) for _ in range(3)
        ]

        async def position(request: dict) -> int:
            response = await http.get(request["status_url"])
            assert response.status_code == 202
            return response.json()["queue_position"]

        start = await position(first)
        assert [await position(second), await position(third)] == [start + 1, start + 2]
        assert (await http.put(first["cancel_url"])).status_code == 202
        assert [await position(second), await position(third)] == [start, start + 1]


async def test_result_of_a_request_still_queued_is_a_400(parked: SimulatorSettings) -> None:
    async with client() as http:
        queued = await submit(http, parked, "fal-ai/flux-1/dev", {"prompt": "x"})
        response = await http.get(queued["response_url"])
    assert response.status_code == 400
    assert isinstance(response.json()["detail"], str)


# --- cancel ------------------------------------------------------------------------------------------


async def test_cancelling_a_queued_request_completes_it_with_an_error(parked: SimulatorSettings) -> None:
    async with client() as http:
        queued = await submit(http, parked, "fal-ai/flux-1/dev", {"prompt": "x"})
        cancel = await http.put(queued["cancel_url"])
        status = await http.get(queued["status_url"])
        result = await http.get(queued["response_url"])
        again = await http.put(queued["cancel_url"])
    assert (cancel.status_code, cancel.json()) == (202, {"status": "CANCELLATION_REQUESTED"})
    assert status.status_code == 200
    assert status.json()["status"] == "COMPLETED"
    assert status.json()["error_type"] == "request_cancelled"
    assert status.json()["error"]
    assert result.status_code == 400
    assert result.json()["error_type"] == "request_cancelled"
    assert (again.status_code, again.json()) == (400, {"status": "ALREADY_COMPLETED"})


async def test_cancelling_a_running_request_completes_it(running: SimulatorSettings) -> None:
    async with client() as http:
        queued = await submit(http, running, "fal-ai/flux-1/dev", {"prompt": "x"})
        assert (await http.get(queued["status_url"])).json()["status"] == "IN_PROGRESS"
        cancel = await http.put(queued["cancel_url"])
        status = await http.get(queued["status_url"], params={"logs": "1"})
    assert cancel.status_code == 202
    assert status.status_code == 200
    assert status.json()["status"] == "COMPLETED"
    assert status.json()["error_type"] == "request_cancelled"
    assert [entry["message"] for entry in status.json()["logs"]][-1] == "Request cancelled"


async def test_cancelling_a_completed_request_reports_already_completed(fast: SimulatorSettings) -> None:
    async with client() as http:
        queued, result = await run_to_result(http, fast, "fal-ai/flux-1/schnell", {"prompt": "x"})
        cancel = await http.put(queued["cancel_url"])
        result_again = await http.get(queued["response_url"])
    assert (cancel.status_code, cancel.json()) == (400, {"status": "ALREADY_COMPLETED"})
    assert result.status_code == result_again.status_code == 200
    assert result.json() == result_again.json()


async def test_a_start_timeout_shorter_than_the_queue_ends_in_a_user_timeout(
    parked: SimulatorSettings,
) -> None:
    async with client() as http:
        response = await http.post(
            f"{parked.public_url}/fal-ai/flux-1/dev",
            json={"prompt": "x"},
            headers={"X-Fal-Request-Timeout": "0.05"},
        )
        queued = response.json()
        status = (await wait_completed(http, queued["status_url"]))[-1]
        result = await http.get(queued["response_url"])
    assert status.json()["error_type"] == "request_timeout"
    assert result.status_code == 504
    assert result.headers["x-fal-request-timeout-type"] == "user"
    assert result.headers["x-fal-error-type"] == "request_timeout"


# --- validation ----------------------------------------------------------------------------------


async def test_invalid_input_is_accepted_then_the_result_is_fals_422(fast: SimulatorSettings) -> None:
    async with client() as http:
        queued = await submit(http, fast, "fal-ai/flux-1/schnell", {"prompt": "x", "num_inference_steps": 28})
        status = (await wait_completed(http, queued["status_url"]))[-1]
        result = await http.get(queued["response_url"])
    assert status.status_code == 200
    assert "error" not in status.json()
    assert result.status_code == 422
    assert result.headers["x-fal-retryable"] == "false"
    assert result.json() == {
        "detail": [
            {
                "loc": ["body", "num_inference_steps"],
                "msg": "Input should be less than or equal to 12",
                "type": "less_than_equal",
                "ctx": {"le": 12},
                "input": 28,
                "url": "https://docs.fal.ai/errors/#less_than_equal",
            }
        ]
    }


async def test_every_violation_is_reported_with_its_location(fast: SimulatorSettings) -> None:
    cases = {
        "fal-ai/flux-1/dev": (
            {
                "num_images": 5,
                "guidance_scale": 0.5,
                "output_format": "gif",
                "image_size": "huge",
                "seed": "abc",
                "acceleration": "max",
            },
            {
                ("prompt",): "missing",
                ("image_size",): "one_of",
                ("guidance_scale",): "greater_than_equal",
                ("num_images",): "less_than_equal",
                ("seed",): "int_parsing",
                ("output_format",): "one_of",
                ("acceleration",): "one_of",
            },
        ),
        "fal-ai/flux-1/dev/image-to-image": (
            {"prompt": "x", "image_url": png_data_uri(64, 64), "strength": 0, "num_inference_steps": 5},
            {("strength",): "greater_than_equal", ("num_inference_steps",): "greater_than_equal"},
        ),
        "fal-ai/flux-pro/kontext/text-to-image": (
            {"prompt": "x", "safety_tolerance": 2, "aspect_ratio": "5:4", "enhance_prompt": "yes"},
            {("safety_tolerance",): "one_of", ("aspect_ratio",): "one_of", ("enhance_prompt",): "bool_type"},
        ),
        "fal-ai/flux-pro/kontext/multi": (
            {"prompt": "x", "image_urls": []},
            {("image_urls",): "sequence_too_short"},
        ),
        "fal-ai/flux-1/schnell": (
            {"prompt": "x", "image_size": {"width": 8, "height": 99999}},
            {("image_size", "width"): "greater_than_equal", ("image_size", "height"): "less_than_equal"},
        ),
    }
    async with client() as http:
        results = await asyncio.gather(
            *(run_to_result(http, fast, model, args) for model, (args, _) in cases.items())
        )
    for (model, (_, expected)), (_, result) in zip(cases.items(), results, strict=True):
        assert result.status_code == 422, model
        found = {tuple(entry["loc"][1:]): entry["type"] for entry in result.json()["detail"]}
        assert found == expected, model
        for entry in result.json()["detail"]:
            assert entry["loc"][0] == "body"
            assert entry["url"] == f"https://docs.fal.ai/errors/#{entry['type']}"
            assert entry["msg"]
        one_of = [entry for entry in result.json()["detail"] if entry["type"] == "one_of"]
        for entry in one_of:
            assert isinstance(entry["ctx"]["expected"], list)


async def test_a_blocked_word_in_the_prompt_is_a_content_policy_violation(fast: SimulatorSettings) -> None:
    async with client() as http:
        _, result = await run_to_result(http, fast, "fal-ai/flux-1/dev", {"prompt": "the Forbidden fruit"})
    assert result.status_code == 422
    [entry] = result.json()["detail"]
    assert entry["type"] == "content_policy_violation"
    assert entry["loc"] == ["body", "prompt"]
    assert entry["input"] == "the Forbidden fruit"
    assert entry["url"] == "https://docs.fal.ai/errors/#content_policy_violation"


# --- determinism and image inputs ----------------------------------------------------------------


async def test_the_same_prompt_and_seed_give_identical_bytes(fast: SimulatorSettings) -> None:
    async def first_image(args: dict) -> tuple[int, bytes]:
        async with client() as http:
            _, result = await run_to_result(http, fast, "fal-ai/flux-1/schnell", args)
        body = result.json()
        data, _ = await fetch_image(body["images"][0]["url"])
        return body["seed"], data

    (_, a), (_, b), (_, c), (d_seed, d), (_, e) = await asyncio.gather(
        first_image({"prompt": "a violet moon", "seed": 1234}),
        first_image({"prompt": "a violet moon", "seed": 1234}),
        first_image({"prompt": "a violet moon", "seed": 1235}),
        first_image({"prompt": "a violet moon"}),
        first_image({"prompt": "a violet sun", "seed": 1234}),
    )
    assert a == b
    assert a != c and a != e
    assert isinstance(d_seed, int)
    _, replay = await first_image({"prompt": "a violet moon", "seed": d_seed})
    assert replay == d


async def test_image_inputs_are_downloaded_from_urls_and_data_uris(fast: SimulatorSettings) -> None:
    async with client() as http:
        _, source = await run_to_result(http, fast, "fal-ai/flux-1/dev", {"prompt": "a garden", "seed": 1})
        hosted = source.json()["images"][0]["url"]
        i2i, kontext, multi, redux = await asyncio.gather(
            run_to_result(
                http,
                fast,
                "fal-ai/flux-1/dev/image-to-image",
                {"prompt": "x", "image_url": png_data_uri(300, 200)},
            ),
            run_to_result(
                http, fast, "fal-ai/flux-pro/kontext", {"prompt": "make it night", "image_url": hosted}
            ),
            run_to_result(
                http,
                fast,
                "fal-ai/flux-pro/kontext/max/multi",
                {"prompt": "combine", "image_urls": [png_data_uri(400, 800), hosted], "aspect_ratio": "3:2"},
            ),
            run_to_result(http, fast, "fal-ai/flux-1/schnell/redux", {"image_url": hosted, "seed": 3}),
        )
    for _, result in (i2i, kontext, multi, redux):
        assert result.status_code == 200, result.text
    # ⚠ the simulator's choice: image-to-image keeps the input size, in multiples of 16.
    assert (i2i[1].json()["images"][0]["width"], i2i[1].json()["images"][0]["height"]) == (288, 192)
    kontext_image = kontext[1].json()["images"][0]
    assert abs(kontext_image["width"] / kontext_image["height"] - 1024 / 768) < 0.05
    multi_image = multi[1].json()["images"][0]
    assert abs(multi_image["width"] / multi_image["height"] - 1.5) < 0.05
    assert redux[1].json()["prompt"] == ""
    _, image = await fetch_image(redux[1].json()["images"][0]["url"])
    assert image.size == (1024, 768)


async def test_unreachable_or_undecodable_images_fail_like_fal(fast: SimulatorSettings) -> None:
    cases = [
        ("fal-ai/flux-1/dev/redux", {"image_url": "http://127.0.0.1:9/nothing.png"}, "file_download_error"),
        (
            "fal-ai/flux-1/dev/redux",
            {"image_url": f"{fast.public_url}/files/nope/0.png"},
            "file_download_error",
        ),
        ("fal-ai/flux-1/dev/redux", {"image_url": "ftp://example.invalid/a.png"}, "file_download_error"),
        ("fal-ai/flux-1/dev/redux", {"image_url": "data:text/plain;base64,aGVsbG8="}, "image_load_error"),
        ("fal-ai/flux-1/dev/redux", {"image_url": "data:image/png;base64,!!!"}, "image_load_error"),
    ]
    async with client() as http:
        results = await asyncio.gather(*(run_to_result(http, fast, model, args) for model, args, _ in cases))
        _, multi = await run_to_result(
            http,
            fast,
            "fal-ai/flux-pro/kontext/multi",
            {"prompt": "x", "image_urls": [png_data_uri(32, 32), "not a url"]},
        )
    for (_, _, expected), (_, result) in zip(cases, results, strict=True):
        assert result.status_code == 422
        [entry] = result.json()["detail"]
        assert (entry["type"], entry["loc"]) == (expected, ["body", "image_url"])
    [entry] = multi.json()["detail"]
    assert (entry["type"], entry["loc"]) == ("file_download_error", ["body", "image_urls", 1])


async def test_sync_mode_returns_data_uris(fast: SimulatorSettings) -> None:
    async with client() as http:
        _, result = await run_to_result(
            http, fast, "fal-ai/flux-1/schnell", {"prompt": "x", "sync_mode": True}
        )
    url = result.json()["images"][0]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert image.size == (1024, 768)


# --- status stream -------------------------------------------------------------------------------


async def test_status_stream_sends_each_change_and_closes_after_completed(fast: SimulatorSettings) -> None:
    events: list[dict] = []
    async with client() as http:
        queued = await submit(http, fast, "fal-ai/flux-1/dev", {"prompt": "x"})
        stream_url = queued["status_url"] + "/stream"
        async with http.stream("GET", stream_url, params={"logs": "1"}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[len("data: ") :]))
    phases = [event["status"] for event in events]
    assert phases[-1] == "COMPLETED"
    assert phases.count("COMPLETED") == 1
    assert [ORDER[p] for p in phases] == sorted(ORDER[p] for p in phases)
    assert events[-1]["metrics"]["inference_time"] > 0
    messages = [entry["message"] for event in events for entry in event.get("logs") or []]
    assert len(messages) == len(set(messages)) == 2


async def test_status_stream_sends_pings_while_nothing_changes(running: SimulatorSettings) -> None:
    async with client() as http:
        queued = await submit(http, running, "fal-ai/flux-1/dev", {"prompt": "x"})
        lines: list[str] = []
        async with http.stream("GET", queued["status_url"] + "/stream") as response:
            async for line in response.aiter_lines():
                lines.append(line)
                if line == ": ping" or len(lines) > 100:
                    break
    assert json.loads(lines[0][len("data: ") :])["status"] == "IN_PROGRESS"
    assert ": ping" in lines


# --- webhooks ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def webhook_inbox() -> Iterator[tuple[str, list[tuple[dict[str, str], bytes]]]]:
    """A server that records every webhook POSTed to it (headers, raw body)."""
    received: list[tuple[dict[str, str], bytes]] = []
    app = FastAPI()

    @app.post("/hook")
    async def hook(request: Request) -> dict[str, bool]:
        received.append((dict(request.headers), await request.body()))
        return {"ok": True}

    with serve(lambda _: app) as base_url:
        yield base_url + "/hook", received


async def wait_for_webhook(
    received: list[tuple[dict[str, str], bytes]], request_id: str
) -> tuple[dict, bytes]:
    deadline = time.monotonic() + WAIT_LIMIT_SECONDS
    while time.monotonic() < deadline:
        for headers, raw in received:
            if json.loads(raw)["request_id"] == request_id:
                return headers, raw
        await asyncio.sleep(0.02)
    raise AssertionError("webhook never arrived")


async def test_webhooks_carry_the_result_and_a_valid_signature(
    fast: SimulatorSettings, webhook_inbox: tuple[str, list]
) -> None:
    hook_url, received = webhook_inbox
    async with client() as http:
        ok = await submit(
            http, fast, "fal-ai/flux-1/schnell", {"prompt": "x", "seed": 5}, fal_webhook=hook_url
        )
        bad = await submit(
            http, fast, "fal-ai/flux-1/schnell", {"prompt": "x", "num_images": 9}, fal_webhook=hook_url
        )
        ok_headers, ok_raw = await wait_for_webhook(received, ok["request_id"])
        _, bad_raw = await wait_for_webhook(received, bad["request_id"])
        result = await http.get(ok["response_url"])
        jwks = (await http.get(f"{fast.public_url}/.well-known/jwks.json")).json()

    assert ok["gateway_request_id"] == ok["request_id"]
    ok_body = json.loads(ok_raw)
    assert ok_body == {
        "request_id": ok["request_id"],
        "gateway_request_id": ok["request_id"],
        "status": "OK",
        "payload": result.json(),
    }
    bad_body = json.loads(bad_raw)
    assert bad_body["status"] == "ERROR"
    assert bad_body["error"] == "Invalid status code: 422"
    assert bad_body["payload"]["detail"][0]["type"] == "less_than_equal"

    timestamp = ok_headers["x-fal-webhook-timestamp"]
    assert abs(int(timestamp) - time.time()) < 300
    message = "\n".join(
        [
            ok_headers["x-fal-webhook-request-id"],
            ok_headers["x-fal-webhook-user-id"],
            timestamp,
            hashlib.sha256(ok_raw).hexdigest(),
        ]
    ).encode()
    [key] = jwks["keys"]
    assert (key["kty"], key["crv"]) == ("OKP", "Ed25519")
    public_key = Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(key["x"] + "=="))
    public_key.verify(bytes.fromhex(ok_headers["x-fal-webhook-signature"]), message)


# --- fal's own client ------------------------------------------------------------------------------


async def test_fals_official_python_client_works_against_the_simulator(
    fast: SimulatorSettings, parked: SimulatorSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fal_client.client, "QUEUE_URL_FORMAT", fast.public_url + "/")
    official = fal_client.AsyncClient(key=TEST_API_KEY)
    handle = await official.submit(
        "fal-ai/flux-pro/kontext/max/text-to-image", {"prompt": "a kite", "seed": 2}
    )
    updates = [status async for status in handle.iter_events(with_logs=True, interval=0.02)]
    result = await handle.get()
    assert isinstance(updates[-1], fal_client.Completed)
    assert result["images"][0]["width"] == 1024

    with pytest.raises(fal_client.client.FalClientHTTPError) as raised:
        await official.subscribe("fal-ai/flux-1/schnell", {"prompt": "x", "num_images": 0})
    assert raised.value.status_code == 422

    monkeypatch.setattr(fal_client.client, "QUEUE_URL_FORMAT", parked.public_url + "/")
    parked_handle = await official.submit("fal-ai/flux-1/dev", {"prompt": "x"})
    assert isinstance(await parked_handle.status(), fal_client.Queued)
    await parked_handle.cancel()
    assert isinstance(await parked_handle.status(), fal_client.Completed)
