"""Object storage for generated images and user uploads: one interface, swappable backends.

``make_storage(settings)`` picks the backend from ``FLUXPIPE_STORAGE``: ``local`` (default, a
folder the gateway serves under ``/files/``) or ``cos`` (Tencent COS through
cos-python-sdk-v5). Keys follow the plan under a per-user prefix (``keys``).
"""

from __future__ import annotations

from services.common.settings import Settings
from services.common.storage.base import Storage, StorageError
from services.common.storage.keys import check_key, upload_key, user_key, user_prefix
from services.common.storage.local import LocalStorage

__all__ = [
    "LocalStorage",
    "Storage",
    "StorageError",
    "check_key",
    "make_storage",
    "upload_key",
    "user_key",
    "user_prefix",
]


def make_storage(settings: Settings) -> Storage:
    if settings.storage_backend == "cos":
        from services.common.storage.cos import CosStorage

        return CosStorage.from_settings(settings)
    return LocalStorage(settings.storage_dir, settings.public_base_url)
