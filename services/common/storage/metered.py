"""Any storage backend, counted for monitoring: bytes and objects written, failed writes."""

from __future__ import annotations

from typing import BinaryIO

from services.common.metrics import STORAGE_BYTES, STORAGE_FAILURES, STORAGE_OBJECTS
from services.common.storage.base import Storage


class MeteredStorage:
    """Wraps ``inner``; every failed ``put``/``put_file`` counts in ``STORAGE_FAILURES``."""

    def __init__(self, inner: Storage, backend: str) -> None:
        self.inner = inner
        self.backend = backend

    async def put(self, key: str, data: bytes, content_type: str, metadata: dict[str, str]) -> str:
        try:
            url = await self.inner.put(key, data, content_type, metadata)
        except Exception:
            STORAGE_FAILURES.labels(self.backend).inc()
            raise
        STORAGE_BYTES.labels(self.backend).inc(len(data))
        STORAGE_OBJECTS.labels(self.backend).inc()
        return url

    async def put_file(
        self, key: str, source: BinaryIO, size: int, content_type: str, metadata: dict[str, str]
    ) -> str:
        try:
            url = await self.inner.put_file(key, source, size, content_type, metadata)
        except Exception:
            STORAGE_FAILURES.labels(self.backend).inc()
            raise
        STORAGE_BYTES.labels(self.backend).inc(size)
        STORAGE_OBJECTS.labels(self.backend).inc()
        return url

    async def get(self, key: str) -> bytes:
        return await self.inner.get(key)

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)

    def url(self, key: str) -> str:
        return self.inner.url(key)

    def object_url(self, key: str) -> str:
        return self.inner.object_url(key)

    def key_for_url(self, url: str) -> str | None:
        return self.inner.key_for_url(url)

    def describe(self) -> str:
        return self.inner.describe()

    def close(self) -> None:
        self.inner.close()
