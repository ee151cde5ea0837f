"""Object keys as the plan names them, under a per-user prefix.

- user uploads: ``users/<user>/flux_input_<uuid>.<ext>``
- results: ``users/<user>/flux_<model with / as _>_<task id>[_<n>].<ext>`` (``result_key`` in
  the uploader names the file; ``user_key`` puts it under its owner)

A user id that is not a plain, short name is replaced by a digest of it, so a key never carries
characters a bucket or a URL would treat specially and one user's prefix never contains another's.
"""

from __future__ import annotations

import hashlib
import re
import uuid

_SAFE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,255}$")
_PLAIN_USER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def check_key(key: str) -> str:
    if not _SAFE_KEY.match(key) or ".." in key.split("/"):
        raise ValueError(f"unsafe storage key {key!r}")
    return key


def user_prefix(user_id: str) -> str:
    """``users/<user>/``: the folder every object of ``user_id`` lives in."""
    name = user_id if _PLAIN_USER.match(user_id) else "h" + hashlib.sha256(user_id.encode()).hexdigest()[:32]
    return f"users/{name}/"


def user_key(user_id: str, name: str) -> str:
    return check_key(user_prefix(user_id) + name)


def upload_key(user_id: str, extension: str) -> str:
    """A fresh key for a user's uploaded input image: ``users/<user>/flux_input_<uuid>.<ext>``."""
    return user_key(user_id, f"flux_input_{uuid.uuid4().hex}.{extension.lstrip('.')}")
