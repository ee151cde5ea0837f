"""Open WebUI's image engine (the OpenAI images API) against the whole stack, over HTTP.

The official ``openai`` client and the exact request shapes Open WebUI sends (read from its
``routers/images.py``): JSON with ``response_format: "b64_json"``, ``size`` ``""`` or ``"auto"``,
``model`` empty or a DALL·E name, extra parameters an admin set.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import httpx
import openai
import pytest
from PIL import Image

from tests.test_e2e import Stack

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(
        tmp_path_factory.mktemp("fluxpipe-openai"),
        extra_env={"FLUXPIPE_SIM_QUEUE_SECONDS": "0.1", "FLUXPIPE_SIM_RUN_SECONDS": "0.3"},
    )
    yield stack
    if stack.proc.poll() is None:
        stack.stop()


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def test_the_openai_client_generates_images(stack: Stack) -> None:
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=stack.token, timeout=120)
    result = client.images.generate(
        model="fal-ai/flux-1/schnell", prompt="a red fox", n=2, size="1024x576", response_format="b64_json"
    )
    images = [decode(item.b64_json or "") for item in result.data or []]
    assert len(images) == 2
    assert all(img.format == "JPEG" and img.size[0] > img.size[1] for img in images)

    models = client.models.list()
    assert len(models.data) == 11 and "fal-ai/flux-pro/kontext/max/multi" in {m.id for m in models.data}


@pytest.mark.parametrize(
    ("model", "size", "extra"),
    [
        ("", "auto", {}),
        ("dall-e-2", "", {"seed": 7, "steps": 4}),
        ("fal-ai/flux-pro/kontext/text-to-image", "512x512", {"safety_tolerance": "5", "steps": 30}),
    ],
)
def test_open_webuis_generation_request_shapes(stack: Stack, model: str, size: str, extra: dict) -> None:
    body = {"model": model, "prompt": "a quiet harbour", "n": 1, "size": size, "response_format": "b64_json"}
    with httpx.Client(base_url=stack.url, headers=stack.auth, timeout=120) as client:
        r = client.post("/v1/images/generations", json={**body, **extra})
        assert r.status_code == 200, r.text
        (item,) = r.json()["data"]
        image = decode(item["b64_json"])
        assert image.size[0] == image.size[1]  # 1:1, the default, or from 512x512

        history = client.get("/api/flux/history").json()["items"]
        mine = [t for t in history if t["prompt"] == "a quiet harbour"]
        assert mine and mine[0]["status"] == "SUCCESS"
        if model.startswith("fal-ai/"):
            assert mine[0]["model"] == model


def test_a_url_answer_points_at_our_stored_copy(stack: Stack) -> None:
    with httpx.Client(base_url=stack.url, headers=stack.auth, timeout=120) as client:
        r = client.post("/v1/images/generations", json={"prompt": "a lantern", "response_format": "url"})
        assert r.status_code == 200, r.text
        url = r.json()["data"][0]["url"]
        assert url.startswith(f"{stack.url}/files/")
        assert client.get(url).headers["content-type"] == "image/jpeg"


@pytest.mark.parametrize(
    ("headers", "body", "status", "says"),
    [
        ({}, {"prompt": "x"}, 401, "bearer token"),
        (None, {"prompt": "x", "model": "midjourney-v6"}, 404, "model 'midjourney-v6' does not exist"),
        (None, {"prompt": "x", "n": 9}, 400, "n: Input should be less than or equal to 4"),
        (None, {"prompt": "x", "size": "huge"}, 400, "size 'huge' is not WIDTHxHEIGHT"),
        (None, {"prompt": "x", "guidance": 99}, 400, "guidance_scale: Input should be less than or equal"),
        (None, {"prompt": "x", "model": "fal-ai/flux-pro/kontext"}, 400, "use POST /v1/images/edits"),
    ],
)
def test_errors_come_in_openais_shape(stack: Stack, headers, body, status, says) -> None:
    sent = stack.auth if headers is None else headers
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        r = client.post("/v1/images/generations", json=body, headers=sent)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert says in error["message"] and error["type"]
