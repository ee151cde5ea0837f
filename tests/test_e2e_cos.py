"""``fluxpipe up`` storing in a private COS bucket (the local COS), driven over HTTP.

Results go up through the real SDK under the user's prefix; the API hands out pre-signed URLs
made when it answers, while the event log keeps keys and unsigned addresses; COS 5xx on the way
are retried; ``fluxpipe storage check`` passes on the stack's settings and says what is wrong
with bad ones; no COS credential appears in a log line, an event or a response.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from urllib.parse import unquote

import httpx
import pytest
from PIL import Image
from typer.testing import CliRunner

from services.cli import app as cli
from services.cossim.app import Credential
from tests.cos_server import SECRET_ID, SECRET_KEY, RunningCos, running_cos
from tests.test_e2e import Stack, follow

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def cos() -> Iterator[RunningCos]:
    with running_cos() as running:
        yield running


@pytest.fixture(scope="module")
def stack(cos: RunningCos, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("fluxpipe-cos"), extra_env=cos.env())
    yield stack
    if stack.proc.poll() is None:
        stack.stop()


def test_a_four_image_result_is_stored_in_cos_and_served_through_fresh_signed_urls(stack, cos):
    cos.sim.fail_next(2, status=503)
    with httpx.Client(base_url=stack.url, headers=stack.auth, timeout=10) as client:
        r = client.post("/api/flux/text-to-image", json={"prompt": "四 lighthouses at dawn", "num_images": 4})
        assert r.status_code == 202, r.text
        task_id = r.json()["task_id"]
        task, _ = follow(client, task_id, {"SUCCESS", "FAILED"})
        again = client.get(f"/api/flux/task/{task_id}").json()

        assert task["status"] == "SUCCESS" and task["storage_error"] is None
        keys = [img["key"] for img in task["images"]]
        assert keys == [
            f"users/dev/flux_fal-ai_flux-1_dev_{task_id}{suffix}.jpg" for suffix in ("", "_1", "_2", "_3")
        ]
        assert task["image_url"] == task["cloud_image_url"] == task["images"][0]["url"]
        for answer in (task, again):
            for img in answer["images"]:
                assert img["url"].startswith(f"{cos.url}/{img['key']}?") and "q-signature=" in img["url"]
                fetched = httpx.get(img["url"])
                assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/jpeg"
                Image.open(io.BytesIO(fetched.content)).load()
        assert httpx.get(f"{cos.url}/{keys[0]}").status_code == 403, "the bucket is private"

    assert cos.sim.count("PUT", 503) == 2 and all(key in cos.sim.objects for key in keys)
    meta = {k: unquote(v) for k, v in cos.sim.objects[keys[1]].metadata.items()}
    assert meta["x-cos-meta-prompt"] == "四 lighthouses at dawn" and meta["x-cos-meta-task-id"] == task_id
    assert meta["x-cos-meta-source"] == "flux" and meta["x-cos-meta-model"] == "fal-ai/flux-1/dev"

    story = [json.loads(line) for line in stack.cli("events", task_id, "--json").splitlines()]
    [stored] = [e for e in story if e["type"] == "task.images_stored"]
    assert [img["url"] for img in stored["data"]["images"]] == [f"{cos.url}/{key}" for key in keys]
    assert "could not store" in stack.output  # the retried 503s were logged, without secrets
    for text in (stack.output, json.dumps(story), json.dumps(task)):
        assert SECRET_KEY not in text


def storage_check(stack: Stack, **env: str) -> tuple[int, str]:
    """``fluxpipe storage check`` with the stack's settings, changed by ``env`` (in-process)."""
    result = CliRunner().invoke(cli, ["storage", "check"], env=stack.env | env)
    return result.exit_code, result.output


def test_storage_check_passes_on_the_stacks_settings_and_names_what_is_wrong_otherwise(stack, cos):
    objects = set(cos.sim.objects)
    good = subprocess.run(
        [sys.executable, "-m", "services.cli", "storage", "check"],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert good.returncode == 0, good.stderr
    assert "write:  ok" in good.stdout and "fetch:  ok (pre-signed URL)" in good.stdout
    assert "storage check passed" in good.stdout and set(cos.sim.objects) == objects, "the probe is deleted"

    code, said = storage_check(stack, COS_SECRET_KEY="not-the-secret-key-123456")
    assert code == 1 and "SignatureDoesNotMatch" in said and "check COS_SECRET_KEY" in said
    assert "not-the-secret-key-123456" not in said

    code, said = storage_check(stack, COS_SECRET_ID="AKIDnobody")
    assert code == 1 and "InvalidAccessKeyId" in said

    code, said = storage_check(stack, COS_PUBLIC_READ="true")
    assert code == 1 and "answered 403" in said and "refuses anonymous reads" in said

    code, said = storage_check(stack, COS_BUCKET="")
    assert code == 1 and "needs COS_BUCKET" in said
    assert set(cos.sim.objects) == objects


def test_a_revoked_key_leaves_the_task_successful_with_fals_url_and_a_clear_storage_error(stack, cos):
    credential = cos.sim.credentials[SECRET_ID]
    cos.sim.credentials[SECRET_ID] = Credential("the-key-was-rotated-in-the-console")
    try:
        with httpx.Client(base_url=stack.url, headers=stack.auth, timeout=10) as client:
            r = client.post("/api/flux/text-to-image", json={"prompt": "a revoked key"})
            task_id = r.json()["task_id"]
            deadline = time.monotonic() + 90
            task = client.get(f"/api/flux/task/{task_id}").json()
            while not task["storage_error"]:
                assert time.monotonic() < deadline, f"no storage error: {task}"
                time.sleep(0.1)
                task = client.get(f"/api/flux/task/{task_id}").json()
    finally:
        cos.sim.credentials[SECRET_ID] = credential
    assert task["status"] == "SUCCESS" and task["cloud_image_url"] is None
    assert task["image_url"] == task["provider_image_url"] and task["image_url"].startswith("http")
    assert "403 SignatureDoesNotMatch" in task["storage_error"] and "COS_SECRET_KEY" in task["storage_error"]
    assert SECRET_KEY not in task["storage_error"] and "q-signature" not in task["storage_error"]
    status = json.loads(stack.cli("status", "--json"))
    assert status["dead_letters"].get("uploader") == 1, status["dead_letters"]


def test_the_openai_images_route_hands_out_signed_urls_and_reads_the_bytes_through_cos(stack, cos):
    with httpx.Client(base_url=stack.url, headers=stack.auth, timeout=60) as client:
        by_url = client.post("/v1/images/generations", json={"prompt": "a lantern", "response_format": "url"})
        assert by_url.status_code == 200, by_url.text
        url = by_url.json()["data"][0]["url"]
        reads_before = cos.sim.count("GET", 200)
        inline = client.post(
            "/v1/images/generations", json={"prompt": "a kite", "response_format": "b64_json"}
        )
        assert inline.status_code == 200, inline.text
    assert cos.sim.count("GET", 200) == reads_before + 1, "the b64 answer was read from the bucket"
    assert url.startswith(f"{cos.url}/users/dev/") and "q-signature=" in url
    fetched = httpx.get(url)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/jpeg"
    data = base64.b64decode(inline.json()["data"][0]["b64_json"])
    assert any(stored.data == data for stored in cos.sim.objects.values())


def test_an_upload_is_stored_in_cos_and_an_image_job_uses_it(stack, cos):
    picture = io.BytesIO()
    Image.new("RGB", (320, 200), (30, 160, 90)).save(picture, "PNG")
    with httpx.Client(base_url=stack.url, headers=stack.auth, timeout=30) as client:
        r = client.post(
            "/api/flux/upload-image", files={"file": ("field.png", picture.getvalue(), "image/png")}
        )
        assert r.status_code == 201, r.text
        upload = r.json()
        assert upload["url"].startswith(f"{cos.url}/{upload['key']}?") and "q-signature=" in upload["url"]
        assert httpx.get(upload["url"]).status_code == 200  # signed: fetchable
        assert httpx.get(f"{cos.url}/{upload['key']}").status_code == 403  # the bucket is private
        meta = {k: unquote(v) for k, v in cos.sim.objects[upload["key"]].metadata.items()}
        assert (
            meta["x-cos-meta-source"] == "flux_input" and meta["x-cos-meta-original-filename"] == "field.png"
        )

        job = {"model": "fal-ai/flux-pro/kontext", "prompt": "make it autumn", "image_url": upload["url"]}
        r = client.post("/api/flux/image-to-image", json=job)
        assert r.status_code == 202, r.text
        task, _ = follow(client, r.json()["task_id"], {"SUCCESS", "FAILED"})
        assert task["status"] == "SUCCESS", task

        stranger = client.post(
            "/api/flux/image-to-image",
            json={**job, "image_url": upload["url"]},
            headers={"Authorization": f"Bearer {stack.cli('token', '--user', 'mallory').strip()}"},
        )
        assert stranger.status_code == 422 and "not one of your uploads" in stranger.json()["message"]

    story = stack.cli("events", task["id"], "--json")
    requested = json.loads(story.splitlines()[0])
    assert requested["data"]["image_urls"] == [f"{cos.url}/{upload['key']}"]  # never a signed URL in the log
