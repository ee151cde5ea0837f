"""The storage interface every backend implements, and the one error it raises.

URLs: ``object_url(key)`` is an object's permanent address (what events and the read model
record, never signed); ``url(key)`` is what to hand to a client or to fal *now* (the same for a
local folder or a public-read bucket, a freshly pre-signed URL for a private bucket). ``put``
returns ``url(key)``.
"""

from __future__ import annotations

from typing import BinaryIO, Protocol


class StorageError(Exception):
    """Storing or reading an object failed. The message is safe to record in an event or a
    log line: it never carries a credential or a signature. ``transient`` says whether trying
    again later may succeed (network errors, timeouts, 5xx, throttling)."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


class Storage(Protocol):
    async def put(self, key: str, data: bytes, content_type: str, metadata: dict[str, str]) -> str:
        """Store ``data`` under ``key`` (idempotent: same key, same object); return ``url(key)``."""
        ...

    async def put_file(
        self, key: str, source: BinaryIO, size: int, content_type: str, metadata: dict[str, str]
    ) -> str:
        """Like ``put``, reading ``size`` bytes from ``source`` in parts, never all at once."""
        ...

    async def get(self, key: str) -> bytes: ...

    async def delete(self, key: str) -> None: ...

    def url(self, key: str) -> str:
        """A URL a client can fetch now (pre-signed with an expiry for a private bucket)."""
        ...

    def object_url(self, key: str) -> str:
        """The object's permanent, unsigned address."""
        ...

    def key_for_url(self, url: str) -> str | None:
        """The key of one of this storage's ``object_url``s (or signed URLs); else ``None``."""
        ...

    def describe(self) -> str:
        """Where objects go, for operators (no credentials)."""
        ...

    def close(self) -> None: ...
