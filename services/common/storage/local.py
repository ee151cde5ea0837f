"""Local storage: a directory on disk, served by the gateway under ``/files/``.

``put`` is atomic (a temporary file renamed into place) and idempotent: the same key with the
same bytes gives the same URL, so a redelivered ``TaskCompleted`` overwrites its own copy.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from services.common.storage.keys import check_key


class LocalStorage:
    """A directory on disk, served by the gateway under ``/files/``."""

    def __init__(self, root: Path, public_base_url: str) -> None:
        self.root = root
        self.public_base_url = public_base_url.rstrip("/")

    def url_for(self, key: str) -> str:
        return f"{self.public_base_url}/files/{key}"

    def url(self, key: str) -> str:
        return self.url_for(check_key(key))

    def object_url(self, key: str) -> str:
        return self.url_for(check_key(key))

    async def put(self, key: str, data: bytes, content_type: str, metadata: dict[str, str]) -> str:
        path = self.root / check_key(key)
        await asyncio.to_thread(_write_atomically, path, lambda fh: fh.write(data))
        return self.url_for(key)

    async def put_file(
        self, key: str, source: BinaryIO, size: int, content_type: str, metadata: dict[str, str]
    ) -> str:
        path = self.root / check_key(key)
        await asyncio.to_thread(_write_atomically, path, lambda fh: shutil.copyfileobj(source, fh))
        return self.url_for(key)

    async def get(self, key: str) -> bytes:
        return await asyncio.to_thread((self.root / check_key(key)).read_bytes)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread((self.root / check_key(key)).unlink, missing_ok=True)

    def key_for_url(self, url: str) -> str | None:
        base = f"{self.public_base_url}/files/"
        if not url.startswith(base):
            return None
        return url[len(base) :].split("?", 1)[0] or None

    def describe(self) -> str:
        return f"local folder {self.root} served at {self.public_base_url}/files/"

    def close(self) -> None:
        pass


def _write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
