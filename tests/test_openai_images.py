"""Open WebUI's image engine (the OpenAI images API) against the whole stack, over HTTP.

The official ``openai`` client and the exact request shapes Open WebUI sends (read from its
``routers/images.py``): JSON with ``response_format: "b64_json"``, ``size`` ``""`` or ``"auto"``,
``model`` empty or a DALL·E name, extra parameters an admin set.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator

import httpx
import jwt
import openai
import pytest
from PIL import Image

from tests.test_e2e import Stack

pytestmark = pytest.mark.timeout(240)

SERVICE_KEY = "owui-service-key-" + "k" * 24
FORWARD_SECRET = "owui-forward-secret-" + "s" * 24
SERVICE_KEYS = json.dumps([{"user_id": "owui", "key": SERVICE_KEY, "assert_users": True}])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(
        tmp_path_factory.mktemp("fluxpipe-openai"),
        extra_env={
            "FLUXPIPE_SIM_QUEUE_SECONDS": "0.1",
            "FLUXPIPE_SIM_RUN_SECONDS": "0.3",
            "FLUXPIPE_SERVICE_KEYS": json.dumps(
                [{"user_id": "owui", "key": SERVICE_KEY, "assert_users": True}]
            ),
            "FLUXPIPE_WEBUI_FORWARDED_JWT_SECRET": FORWARD_SECRET,
        },
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


def png(color: tuple[int, int, int], size: tuple[int, int] = (256, 192)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "PNG")
    return out.getvalue()


def history_of(stack: Stack, user: str) -> list[dict]:
    token = stack.cli("token", "--user", user).strip()
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
        return client.get("/api/flux/history").json()["items"]


def test_the_openai_client_edits_an_image(stack: Stack) -> None:
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=stack.token, timeout=120)
    result = client.images.edit(
        model="fal-ai/flux-pro/kontext",
        image=("cat.png", png((200, 40, 40)), "image/png"),
        prompt="make it blue",
        response_format="b64_json",
    )
    (item,) = result.data or []
    assert decode(item.b64_json or "").format in ("JPEG", "PNG")


def test_open_webuis_edit_shapes_and_forwarded_users(stack: Stack) -> None:
    service = {"Authorization": f"Bearer {SERVICE_KEY}"}
    two = [
        ("image[]", ("a.png", png((10, 200, 10)), "image/png")),
        ("image[]", ("b.png", png((10, 10, 200)), "image/png")),
    ]
    form = {"model": "fal-ai/flux-pro/kontext/max", "prompt": "merge them", "n": "1", "size": "1024x1024"}
    forwarded = {**service, "X-OpenWebUI-User-Id": "carol", "X-OpenWebUI-User-Name": "Carol%20C"}
    with httpx.Client(base_url=stack.url, timeout=120) as client:
        r = client.post(
            "/v1/images/edits", data={**form, "response_format": "b64_json"}, files=two, headers=forwarded
        )
        assert r.status_code == 200, r.text
        decode(r.json()["data"][0]["b64_json"])

        older = [("image", ("c.png", png((90, 90, 90)), "image/png"))]
        now = int(time.time())
        claims = {"sub": "dave", "name": "Dave", "email": "d@x", "role": "user", "iss": "open-webui"}
        token = jwt.encode({**claims, "iat": now, "exp": now + 300}, FORWARD_SECRET, algorithm="HS256")
        r = client.post(
            "/v1/images/edits",
            data={"model": "", "prompt": "older release, one image", "size": ""},
            files=older,
            headers={**service, "X-OpenWebUI-User-Jwt": token},
        )
        assert r.status_code == 200, r.text

        r = client.post(
            "/v1/images/generations",
            json={
                "model": "dall-e-2",
                "prompt": "for erin",
                "n": 1,
                "size": "auto",
                "response_format": "b64_json",
            },
            headers={**service, "X-OpenWebUI-User-Id": "erin"},
        )
        assert r.status_code == 200, r.text

    (carols,) = history_of(stack, "carol")
    assert carols["model"] == "fal-ai/flux-pro/kontext/max/multi" and len(carols["input_image_urls"]) == 2
    (daves,) = history_of(stack, "dave")
    assert daves["model"] == "fal-ai/flux-pro/kontext" and daves["prompt"] == "older release, one image"
    assert [t["prompt"] for t in history_of(stack, "erin")] == ["for erin"]


@pytest.mark.parametrize(
    ("files", "form", "status", "says"),
    [
        ([("image", ("x.png", b"not an image", "image/png"))], {"prompt": "x"}, 415, "image[0]"),
        ([], {"prompt": "x"}, 400, "send one or more images"),
        (
            [("image", ("x.png", png((1, 2, 3)), "image/png"))],
            {"prompt": "x", "model": "fal-ai/flux-pro/kontext/multi"},
            400,
            "takes 2 to 4 image(s), got 1",
        ),
    ],
)
def test_edit_errors_come_in_openais_shape(stack: Stack, files, form, status, says) -> None:
    with httpx.Client(base_url=stack.url, headers=stack.auth, timeout=60) as client:
        r = client.post("/v1/images/edits", data=form, files=files or {"none": ("", b"", "text/plain")})
    assert r.status_code == status, r.text
    assert says in r.json()["error"]["message"]
