"""Object storage for generated images and user uploads: one interface, swappable backends.

``put`` is idempotent: the same key with the same bytes gives the same URL, so a redelivered
``TaskCompleted`` simply overwrites the copy it already made.
"""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
from pathlib import Path
from typing import Protocol

from services.common.metrics import STORAGE_BYTES, STORAGE_FAILURES, STORAGE_OBJECTS
from services.common.settings import Settings

_SAFE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,255}$")


class Storage(Protocol):
    async def put(self, key: str, data: bytes, content_type: str, metadata: dict[str, str]) -> str:
        """Store ``data`` under ``key``; return its public URL."""
        ...


def check_key(key: str) -> str:
    if not _SAFE_KEY.match(key) or ".." in key.split("/"):
        raise ValueError(f"unsafe storage key {key!r}")
    return key


class LocalStorage:
    """A directory on disk, served by the gateway under ``/files/``."""

    def __init__(self, root: Path, public_base_url: str) -> None:
        self.root = root
        self.public_base_url = public_base_url.rstrip("/")

    def url_for(self, key: str) -> str:
        return f"{self.public_base_url}/files/{key}"

    async def put(self, key: str, data: bytes, content_type: str, metadata: dict[str, str]) -> str:
        path = self.root / check_key(key)
        await asyncio.to_thread(_write_atomically, path, data)
        return self.url_for(key)


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class MeteredStorage:
    """Any backend, counting bytes and objects written and failed writes (Prometheus)."""

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


def make_storage(settings: Settings) -> Storage:
    return MeteredStorage(LocalStorage(settings.storage_dir, settings.public_base_url), "local")
