"""The COS backend through the real SDK (cos-python-sdk-v5) over real HTTP, against the local
COS of services/cossim, which checks every signature as COS does."""

from __future__ import annotations

import asyncio
import io
import logging
import re
from collections.abc import Iterator
from urllib.parse import unquote

import httpx
import pytest
from qcloud_cos import CosConfig, CosS3Client

from services.common.embedded import free_port
from services.common.settings import Settings
from services.common.storage import StorageError, fresh_url, make_storage, upload_key, user_key, user_prefix
from services.common.storage.cos import CosStorage, encode_metadata
from tests.cos_server import BUCKET, SECRET_ID, SECRET_KEY, RunningCos, running_cos

pytestmark = pytest.mark.timeout(60)

TOKEN = "temporary-session-token-0123456789abcdef"


@pytest.fixture(scope="module")
def cos() -> Iterator[RunningCos]:
    with running_cos() as running:
        yield running


@pytest.fixture(scope="module")
def public_cos() -> Iterator[RunningCos]:
    with running_cos(public_read=True) as running:
        yield running


@pytest.fixture
def fresh(cos: RunningCos) -> RunningCos:
    cos.sim.faults.clear()
    cos.sim.requests.clear()
    return cos


def storage_for(cos: RunningCos, **env: str) -> CosStorage:
    storage = getattr(make_storage(Settings(**cos.env(**env))), "inner", None)
    assert isinstance(storage, CosStorage)
    return storage


def sdk_client(cos: RunningCos, secret_key: str = SECRET_KEY) -> CosS3Client:
    return CosS3Client(
        CosConfig(
            SecretId=SECRET_ID, SecretKey=secret_key, Scheme="http", Domain=cos.url.removeprefix("http://")
        ),
        retry=0,
    )


async def test_a_private_object_keeps_type_and_metadata_and_is_read_only_through_a_fresh_signed_url(fresh):
    storage = storage_for(fresh)
    key = user_key("alice", "flux_fal-ai_flux-1_dev_t1.png")
    prompt = "熊猫 in the snow, 100% calm & quiet"
    url = await storage.put(
        key, b"\x89PNG-bytes", "image/png", {"source": "flux", "task_id": "t1", "prompt": prompt}
    )

    stored = fresh.sim.objects[key]
    assert stored.content_type == "image/png"
    assert stored.metadata["x-cos-meta-source"] == "flux" and stored.metadata["x-cos-meta-task-id"] == "t1"
    assert stored.metadata["x-cos-meta-prompt"].isascii()
    assert unquote(stored.metadata["x-cos-meta-prompt"]) == prompt
    assert "q-signature=" in url and "q-signature=" in storage.url(key)
    async with httpx.AsyncClient() as http:
        fetched = await http.get(storage.url(key))
        plain = await http.get(storage.object_url(key))
    assert fetched.status_code == 200 and fetched.content == b"\x89PNG-bytes"
    assert fetched.headers["content-type"] == "image/png"
    assert plain.status_code == 403 and "<Code>AccessDenied</Code>" in plain.text
    assert storage.object_url(key) == f"{fresh.url}/users/alice/flux_fal-ai_flux-1_dev_t1.png"
    assert await storage.get(key) == b"\x89PNG-bytes"
    assert storage.key_for_url(storage.object_url(key)) == key == storage.key_for_url(url)
    assert "q-signature=" in fresh_url(storage, storage.object_url(key))
    assert fresh_url(storage, "https://fal.media/files/x.png") == "https://fal.media/files/x.png"
    storage.close()


async def test_a_public_read_bucket_hands_out_plain_urls_anyone_can_fetch(public_cos):
    storage = storage_for(public_cos, COS_KEY_PREFIX="fluxpipe/")
    key = user_key("bob", "flux_input_abc.jpg")
    url = await storage.put(key, b"jpeg", "image/jpeg", {"source": "flux_input", "filename": "cat.jpg"})
    assert url == storage.url(key) == f"{public_cos.url}/fluxpipe/users/bob/flux_input_abc.jpg"
    assert "fluxpipe/users/bob/flux_input_abc.jpg" in public_cos.sim.objects
    async with httpx.AsyncClient() as http:
        answer = await http.get(url)
    assert answer.status_code == 200 and answer.content == b"jpeg"
    storage.close()


async def test_a_cdn_base_url_is_what_public_urls_start_with(public_cos):
    storage = storage_for(public_cos, COS_PUBLIC_BASE_URL="https://img.example.com/")
    assert storage.url("users/bob/a.png") == "https://img.example.com/users/bob/a.png"
    storage.close()


async def test_a_wrong_secret_key_is_refused_with_coss_reason_and_no_secret_in_it(fresh):
    storage = storage_for(fresh, COS_SECRET_KEY="not-the-real-secret-key-000")
    with pytest.raises(StorageError) as refused:
        await storage.put("users/a/x.png", b"x", "image/png", {})
    text = str(refused.value)
    assert "403 SignatureDoesNotMatch" in text and "COS_SECRET_KEY" in text
    assert not refused.value.transient
    assert "not-the-real-secret-key-000" not in text and "q-signature" not in text
    assert fresh.sim.count("PUT") == 1, "a refusal is not retried"
    assert "users/a/x.png" not in fresh.sim.objects
    storage.close()


async def test_an_unknown_secret_id_is_invalid_access_key_id(fresh):
    storage = storage_for(fresh, COS_SECRET_ID="AKIDunknown000")
    with pytest.raises(StorageError, match="403 InvalidAccessKeyId.*COS_SECRET_ID"):
        await storage.put("users/a/x.png", b"x", "image/png", {})
    storage.close()


def test_a_header_changed_after_signing_fails_the_signature(fresh):
    client = sdk_client(fresh)
    auth = client.get_auth(
        Method="PUT", Bucket=BUCKET, Key="users/a/t.png", Headers={"x-cos-meta-task-id": "t1"}
    )
    headers = {"Authorization": auth}
    honest = httpx.put(
        f"{fresh.url}/users/a/t.png", content=b"x", headers=headers | {"x-cos-meta-task-id": "t1"}
    )
    tampered = httpx.put(
        f"{fresh.url}/users/a/t.png", content=b"y", headers=headers | {"x-cos-meta-task-id": "t2"}
    )
    assert honest.status_code == 200
    assert tampered.status_code == 403 and "<Code>SignatureDoesNotMatch</Code>" in tampered.text
    assert fresh.sim.objects["users/a/t.png"].data == b"x"


def test_a_body_that_does_not_match_its_content_md5_is_refused(fresh):
    client = sdk_client(fresh)
    digest = "XUFAKrxLKna5cZ2REBfFkg=="  # md5 of b"hello"
    auth = client.get_auth(
        Method="PUT", Bucket=BUCKET, Key="users/a/md5.txt", Headers={"Content-MD5": digest}
    )
    corrupted = httpx.put(
        f"{fresh.url}/users/a/md5.txt",
        content=b"hellO",
        headers={"Authorization": auth, "Content-MD5": digest},
    )
    assert corrupted.status_code == 400 and "<Code>BadDigest</Code>" in corrupted.text
    assert "users/a/md5.txt" not in fresh.sim.objects


def test_an_expired_signature_is_refused_and_a_signature_for_one_key_does_not_open_another(fresh):
    fresh.sim.objects.clear()
    storage = storage_for(fresh)
    asyncio.run(storage.put("users/a/e.png", b"e", "image/png", {}))
    client = sdk_client(fresh)
    expired = client.get_presigned_url(Bucket=BUCKET, Key="users/a/e.png", Method="GET", Expired=-61)
    answer = httpx.get(expired)
    assert answer.status_code == 403
    assert "<Code>AccessDenied</Code>" in answer.text and "Request has expired" in answer.text
    valid = client.get_presigned_url(Bucket=BUCKET, Key="users/a/e.png", Method="GET", Expired=60)
    assert httpx.get(valid).status_code == 200
    other = httpx.get(valid.replace("/users/a/e.png", "/users/a/f.png"))
    assert other.status_code == 403 and "SignatureDoesNotMatch" in other.text
    forged = sdk_client(fresh, secret_key="guessed").get_presigned_url(
        Bucket=BUCKET, Key="users/a/e.png", Method="GET", Expired=60
    )
    assert httpx.get(forged).status_code == 403
    storage.close()


async def test_temporary_credentials_need_their_token_on_every_request_and_signed_url():
    with running_cos(token=TOKEN) as cos:
        storage = storage_for(cos, COS_TOKEN=TOKEN)
        key = "users/a/tmp.png"
        await storage.put(key, b"t", "image/png", {})
        async with httpx.AsyncClient() as http:
            assert (await http.get(storage.url(key))).content == b"t"
        without = storage_for(cos)
        with pytest.raises(StorageError, match="InvalidToken"):
            await without.put(key, b"t", "image/png", {})
        storage.close()
        without.close()


async def test_transient_5xx_are_retried_with_backoff_until_the_object_is_stored(fresh):
    storage = storage_for(fresh)
    fresh.sim.fail_next(2, status=503)
    await storage.put("users/a/r.png", b"r", "image/png", {})
    assert [s for m, _, s in fresh.sim.requests if m == "PUT"] == [503, 503, 200]
    assert fresh.sim.objects["users/a/r.png"].data == b"r"
    storage.close()


async def test_when_5xx_persist_the_error_says_so_and_is_transient(fresh):
    storage = storage_for(fresh, COS_RETRY_ATTEMPTS="3")
    fresh.sim.fail_next(3, status=500)
    with pytest.raises(StorageError) as failed:
        await storage.put("users/a/gone.png", b"g", "image/png", {})
    assert (
        failed.value.transient
        and "after 3 attempts" in str(failed.value)
        and "500 InternalError" in str(failed.value)
    )
    assert fresh.sim.count("PUT") == 3
    storage.close()


async def test_a_request_that_times_out_is_retried_and_the_loop_keeps_running_meanwhile(fresh):
    storage = storage_for(fresh, COS_TIMEOUT="1")
    fresh.sim.stall_next(1, seconds=3)
    put = asyncio.create_task(storage.put("users/a/slow.png", b"s", "image/png", {}))
    async with httpx.AsyncClient() as http:
        meanwhile = await http.get(f"{fresh.url}/users/a/none.png")
    assert meanwhile.status_code == 403
    assert not put.done(), "the blocking SDK call must not hold the event loop"
    await put
    assert fresh.sim.objects["users/a/slow.png"].data == b"s"
    assert fresh.sim.count("PUT", 200) == 1
    storage.close()


async def test_a_large_object_goes_up_in_parts_read_one_at_a_time(fresh):
    storage = storage_for(fresh, COS_PART_SIZE=str(1024 * 1024))
    data = bytes(range(256)) * (10 * 1024)  # 2.5 MiB: three parts

    class CountingReader(io.BytesIO):
        largest = 0

        def read(self, size: int | None = -1) -> bytes:
            chunk = super().read(size)
            CountingReader.largest = max(CountingReader.largest, len(chunk))
            return chunk

    fresh.sim.fail_next(1, status=503, methods="PUT")
    url = await storage.put_file(
        "users/a/big.png", CountingReader(data), len(data), "image/png", {"task_id": "big"}
    )
    assert CountingReader.largest == 1024 * 1024
    stored = fresh.sim.objects["users/a/big.png"]
    assert stored.data == data and stored.content_type == "image/png"
    assert stored.metadata == {"x-cos-meta-task-id": "big"} and stored.etag.endswith('-3"')
    assert fresh.sim.count("POST") == 2 and fresh.sim.count("PUT", 200) == 3 and not fresh.sim.uploads
    async with httpx.AsyncClient() as http:
        assert (await http.get(url)).content == data
    await storage.delete("users/a/big.png")
    assert "users/a/big.png" not in fresh.sim.objects
    storage.close()


async def test_a_failed_multipart_upload_is_aborted(fresh):
    storage = storage_for(fresh, COS_PART_SIZE=str(1024 * 1024), COS_RETRY_ATTEMPTS="1")
    fresh.sim.fail_next(1, status=503, methods="PUT")
    with pytest.raises(StorageError, match="upload part 1"):
        await storage.put("users/a/half.png", b"h" * (1024 * 1024 + 1), "image/png", {})
    assert not fresh.sim.uploads and "users/a/half.png" not in fresh.sim.objects
    assert fresh.sim.count("DELETE", 204) == 1
    storage.close()


async def test_the_sdk_never_logs_credentials_or_signatures(fresh, caplog):
    caplog.set_level(logging.DEBUG)
    storage = storage_for(fresh, COS_TOKEN="", COS_SECRET_KEY="a-wrong-secret-key-that-must-not-leak")
    with pytest.raises(StorageError):
        await storage.put("users/a/log.png", b"l", "image/png", {})
    good = storage_for(fresh)
    await good.put("users/a/log.png", b"l", "image/png", {})
    assert "a-wrong-secret-key-that-must-not-leak" not in caplog.text and SECRET_KEY not in caplog.text
    assert "q-signature" not in caplog.text and "Authorization" not in caplog.text
    storage.close()
    good.close()


async def test_an_unreachable_endpoint_is_retried_then_named(fresh):
    storage = storage_for(fresh, COS_DOMAIN=f"127.0.0.1:{free_port()}", COS_RETRY_ATTEMPTS="2")
    with pytest.raises(StorageError) as unreachable:
        await storage.put("users/a/n.png", b"n", "image/png", {})
    assert unreachable.value.transient and "after 2 attempts" in str(unreachable.value)
    assert "COS could not be reached: check COS_REGION, COS_DOMAIN" in str(unreachable.value)
    storage.close()


def test_metadata_is_percent_encoded_and_kept_under_coss_2kb_limit():
    headers = encode_metadata({"prompt": "長い" * 2000, "task_id": "t1"})
    assert sum(len(k) + len(v) for k, v in headers.items()) <= 2048
    assert headers["x-cos-meta-task-id"] == "t1"
    assert re.fullmatch(r"(%[0-9A-F]{2})+", headers["x-cos-meta-prompt"])
    assert set(unquote(headers["x-cos-meta-prompt"])) == {"長", "い"}


def test_keys_live_under_a_per_user_prefix():
    assert user_prefix("alice") == "users/alice/"
    odd = user_prefix("mail@example.com/../x")
    assert re.fullmatch(r"users/h[0-9a-f]{32}/", odd) and odd != user_prefix("mail@example.com")
    assert re.fullmatch(r"users/alice/flux_input_[0-9a-f]{32}\.png", upload_key("alice", "png"))


def test_missing_cos_settings_are_named():
    with pytest.raises(ValueError, match="COS_BUCKET.*COS_SECRET_KEY"):
        make_storage(Settings(FLUXPIPE_STORAGE="cos", COS_REGION="ap-guangzhou", COS_SECRET_ID="x"))
