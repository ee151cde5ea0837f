"""Tencent COS through cos-python-sdk-v5: the production storage backend.

Invariants:
- The SDK blocks; every call runs on this backend's own bounded thread pool (``COS_THREADS``),
  never on the event loop, and the SDK's own retries are off: ours (tenacity, exponential
  backoff with jitter, ``COS_RETRY_ATTEMPTS``) retry only transient failures (network errors,
  timeouts, 5xx, throttling); a refusal (403, 404, 400) fails at once.
- ``put`` is idempotent: a key names one object, and writing it again replaces it whole (a
  single PUT, or a multipart upload that only becomes visible when completed; an upload that
  fails is aborted).
- Objects above ``COS_PART_SIZE`` go up in parts read one at a time from their source. Every
  body carries its ``Content-MD5``, so COS refuses one that was corrupted on the way.
- Credentials never leave this module: errors are re-raised as ``StorageError`` whose text is
  COS's error code and message (no signature, no SecretId/SecretKey/token), and the SDK's
  logger, which writes request headers and signatures, is kept at WARNING.
- Metadata goes out as ``x-cos-meta-<name>`` headers, values percent-encoded (UTF-8), the
  total kept under COS's 2 KB limit.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, BinaryIO, TypeVar
from urllib.parse import quote, unquote

from qcloud_cos import CosConfig, CosS3Client
from qcloud_cos.cos_exception import CosClientError, CosServiceError
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from services.common.settings import Settings
from services.common.storage.base import StorageError
from services.common.storage.keys import check_key

log = logging.getLogger(__name__)

T = TypeVar("T")

META_LIMIT = 2048
TRANSIENT_CODES = frozenset({"RequestTimeout", "SlowDown", "InternalError", "ServiceUnavailable"})
HINTS = {
    "InvalidAccessKeyId": "check COS_SECRET_ID (and COS_TOKEN for temporary credentials)",
    "SignatureDoesNotMatch": "check COS_SECRET_KEY",
    "AccessDenied": "check the credentials' permissions on the bucket, and the clock",
    "NoSuchBucket": "check COS_BUCKET (name-appid) and COS_REGION",
    "InvalidToken": "check COS_TOKEN (temporary credentials expire)",
}
UNREACHABLE_HINT = "COS could not be reached: check COS_REGION, COS_DOMAIN and the network"
_SIGNATURE_PARTS = re.compile(r"(q-(?:ak|signature|sign-time|key-time)|x-cos-security-token)=[^&\s'\"]+")


def encode_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """``{"task_id": "…"}`` → ``{"x-cos-meta-task-id": "<percent-encoded UTF-8>"}``; values are
    shortened (longest first) until the headers fit COS's 2 KB metadata limit."""
    headers = {
        "x-cos-meta-" + re.sub(r"[^a-z0-9-]", "-", name.lower()): quote(value, safe="")
        for name, value in metadata.items()
    }
    while sum(len(k) + len(v) for k, v in headers.items()) > META_LIMIT:
        longest = max(headers, key=lambda k: len(headers[k]))
        value = headers[longest]
        cut = len(value) // 2
        while cut > 0 and "%" in value[max(0, cut - 2) : cut]:
            cut -= 1  # never split a %XX escape
        headers[longest] = value[:cut]
    return headers


def error_code(exc: CosServiceError) -> str:
    """COS's error code; ``Unknown`` when the answer had no error body (a HEAD)."""
    digest = exc.get_digest_msg()
    return str(digest.get("code", "Unknown")) if isinstance(digest, dict) else "Unknown"


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, CosServiceError):
        status = exc.get_status_code()
        return status >= 500 or status in (408, 429) or error_code(exc) in TRANSIENT_CODES
    return isinstance(exc, CosClientError)


class CosStorage:
    """One bucket. ``url`` pre-signs for a private bucket, a fresh signature on every call."""

    def __init__(
        self,
        config: CosConfig,
        *,
        bucket: str,
        public_read: bool,
        public_base_url: str,
        url_expires: int,
        key_prefix: str,
        threads: int,
        retry_attempts: int,
        part_size: int,
        secrets: list[str],
        token: str = "",
    ) -> None:
        self.client = CosS3Client(config, retry=0)
        self.bucket = bucket
        self.public_read = public_read
        self.public_base_url = public_base_url.rstrip("/")
        self.url_expires = url_expires
        self.key_prefix = key_prefix
        self.retry_attempts = retry_attempts
        self.part_size = part_size
        self._secrets = [s for s in secrets if s]
        self._token = token
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cos")
        logging.getLogger("qcloud_cos").setLevel(max(logging.WARNING, logging.getLogger().level))

    @classmethod
    def from_settings(cls, settings: Settings) -> CosStorage:
        missing = [
            name
            for name, value in (
                ("COS_BUCKET", settings.cos_bucket),
                ("COS_REGION or COS_DOMAIN", settings.cos_region or settings.cos_domain),
                ("COS_SECRET_ID", settings.cos_secret_id.get_secret_value()),
                ("COS_SECRET_KEY", settings.cos_secret_key.get_secret_value()),
            )
            if not value
        ]
        if missing:
            raise ValueError(f"FLUXPIPE_STORAGE=cos needs {', '.join(missing)}")
        token = settings.cos_token.get_secret_value()
        config = CosConfig(
            Region=settings.cos_region or None,
            SecretId=settings.cos_secret_id.get_secret_value(),
            SecretKey=settings.cos_secret_key.get_secret_value(),
            Token=token or None,
            Scheme=settings.cos_scheme,
            Domain=settings.cos_domain or None,
            Timeout=settings.cos_timeout,
            PoolConnections=settings.cos_threads,
            PoolMaxSize=settings.cos_threads,
        )
        host = settings.cos_domain or f"{settings.cos_bucket}.cos.{settings.cos_region}.myqcloud.com"
        return cls(
            config,
            bucket=settings.cos_bucket,
            public_read=settings.cos_public_read,
            public_base_url=settings.cos_public_base_url or f"{settings.cos_scheme}://{host}",
            url_expires=settings.cos_url_expires,
            key_prefix=settings.cos_key_prefix,
            threads=settings.cos_threads,
            retry_attempts=settings.cos_retry_attempts,
            part_size=settings.cos_part_size,
            secrets=[
                settings.cos_secret_id.get_secret_value(),
                settings.cos_secret_key.get_secret_value(),
                token,
            ],
            token=token,
        )

    def object_key(self, key: str) -> str:
        return self.key_prefix + check_key(key)

    def object_url(self, key: str) -> str:
        return f"{self.public_base_url}/{quote(self.object_key(key), safe='/-_.~')}"

    def url(self, key: str) -> str:
        if self.public_read:
            return self.object_url(key)
        params = {"x-cos-security-token": self._token} if self._token else {}
        signed: str = self.client.get_presigned_url(
            Bucket=self.bucket,
            Key=self.object_key(key),
            Method="GET",
            Expired=self.url_expires,
            Params=params,
        )
        return signed

    def key_for_url(self, url: str) -> str | None:
        base = f"{self.public_base_url}/{quote(self.key_prefix, safe='/-_.~')}"
        key = unquote(url[len(base) :].split("?", 1)[0]) if url.startswith(base) else ""
        return key or None

    def describe(self) -> str:
        access = "public-read" if self.public_read else f"private, URLs signed for {self.url_expires}s"
        return (
            f"COS bucket {self.bucket} at {self.public_base_url} ({access}), key prefix {self.key_prefix!r}"
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def put(self, key: str, data: bytes, content_type: str, metadata: dict[str, str]) -> str:
        if len(data) > self.part_size:
            return await self.put_file(key, io.BytesIO(data), len(data), content_type, metadata)
        await self._call(
            "store",
            key,
            self.client.put_object,
            Bucket=self.bucket,
            Key=self.object_key(key),
            Body=data,
            EnableMD5=True,
            ContentType=content_type,
            Metadata=encode_metadata(metadata),
        )
        return self.url(key)

    async def put_file(
        self, key: str, source: BinaryIO, size: int, content_type: str, metadata: dict[str, str]
    ) -> str:
        if size <= self.part_size:
            return await self.put(key, source.read(), content_type, metadata)
        name = self.object_key(key)
        started = await self._call(
            "start a multipart upload of",
            key,
            self.client.create_multipart_upload,
            Bucket=self.bucket,
            Key=name,
            ContentType=content_type,
            Metadata=encode_metadata(metadata),
        )
        upload_id = started["UploadId"]
        parts: list[dict[str, Any]] = []
        try:
            number = 1
            while part := source.read(self.part_size):
                done = await self._call(
                    f"upload part {number} of",
                    key,
                    self.client.upload_part,
                    Bucket=self.bucket,
                    Key=name,
                    Body=part,
                    EnableMD5=True,
                    PartNumber=number,
                    UploadId=upload_id,
                )
                parts.append({"PartNumber": number, "ETag": done["ETag"]})
                number += 1
            await self._call(
                "complete the multipart upload of",
                key,
                self.client.complete_multipart_upload,
                Bucket=self.bucket,
                Key=name,
                UploadId=upload_id,
                MultipartUpload={"Part": parts},
            )
        except BaseException:
            await self._abort(name, upload_id)
            raise
        return self.url(key)

    async def get(self, key: str) -> bytes:
        def read() -> bytes:
            response = self.client.get_object(Bucket=self.bucket, Key=self.object_key(key))
            body: bytes = response["Body"].get_raw_stream().read()
            return body

        return await self._call("read", key, read)

    async def delete(self, key: str) -> None:
        await self._call(
            "delete", key, self.client.delete_object, Bucket=self.bucket, Key=self.object_key(key)
        )

    async def _abort(self, name: str, upload_id: str) -> None:
        try:
            await self._run(
                partial(self.client.abort_multipart_upload, Bucket=self.bucket, Key=name, UploadId=upload_id)
            )
        except Exception as exc:
            log.warning("could not abort the multipart upload of %s: %s", name, self.describe_error(exc))

    async def _run(self, call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    async def _call(self, action: str, key: str, fn: Callable[..., T], **kwargs: Any) -> T:
        """``fn(**kwargs)`` on the pool, retried while it fails transiently; ``StorageError``."""
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.retry_attempts),
            wait=wait_exponential_jitter(multiplier=0.2, max=5.0, jitter=0.2),
            retry=retry_if_exception(is_transient),
            reraise=True,
            before_sleep=lambda state: log.warning(
                "COS: could not %s %s (attempt %d), retrying: %s",
                action,
                key or self.bucket,
                state.attempt_number,
                self.describe_error(state.outcome.exception()) if state.outcome else "",
            ),
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._run(partial(fn, **kwargs))
        except (CosServiceError, CosClientError) as exc:
            tries = f" after {self.retry_attempts} attempts" if is_transient(exc) else ""
            raise StorageError(
                f"could not {action} {key or self.bucket} in COS{tries}: {self.describe_error(exc)}",
                transient=is_transient(exc),
            ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def describe_error(self, exc: BaseException | None) -> str:
        if isinstance(exc, CosServiceError):
            code = error_code(exc)
            digest = exc.get_digest_msg()
            message = digest.get("message", "") if isinstance(digest, dict) else ""
            text = f"{exc.get_status_code()} {code}: {message}".rstrip(": ")
            if code in HINTS:
                text += f" ({HINTS[code]})"
        else:
            text = f"{type(exc).__name__}: {exc} ({UNREACHABLE_HINT})"
        text = _SIGNATURE_PARTS.sub(r"\1=***", text)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text
