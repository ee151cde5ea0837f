"""Object storage for generated images and user uploads: one interface, swappable backends.

``make_storage(settings)`` picks the backend from ``FLUXPIPE_STORAGE``: ``local`` (default, a
folder the gateway serves under ``/files/``) or ``cos`` (Tencent COS through
cos-python-sdk-v5). Keys follow the plan under a per-user prefix (``keys``).
"""

from __future__ import annotations

from typing import Any

from services.common.settings import Settings
from services.common.storage.base import Storage, StorageError
from services.common.storage.keys import check_key, upload_key, user_key, user_prefix
from services.common.storage.local import LocalStorage
from services.common.storage.metered import MeteredStorage

__all__ = [
    "LocalStorage",
    "MeteredStorage",
    "Storage",
    "StorageError",
    "check_key",
    "fresh_url",
    "fresh_urls",
    "make_storage",
    "upload_key",
    "user_key",
    "user_prefix",
]


def make_storage(settings: Settings) -> Storage:
    """The configured backend, counted for monitoring (``MeteredStorage``)."""
    if settings.storage_backend == "cos":
        from services.common.storage.cos import CosStorage

        return MeteredStorage(CosStorage.from_settings(settings), "cos")
    return MeteredStorage(LocalStorage(settings.storage_dir, settings.public_base_url), "local")


def fresh_urls(storage: Storage, images: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
    """A task's stored images with URLs to hand out now (``storage.url(key)``: freshly
    pre-signed for a private bucket), and the first one's URL."""
    fresh = [{**img, "url": storage.url(img["key"])} if img.get("key") else img for img in images]
    return fresh[0].get("url"), fresh


def fresh_url(storage: Storage, url: str) -> str:
    """``url`` made fetchable now if it is one of ``storage``'s objects (a fresh pre-signed URL
    for a private bucket), e.g. an uploaded input just before it is handed to fal; any other
    URL unchanged."""
    key = storage.key_for_url(url)
    return storage.url(key) if key else url
