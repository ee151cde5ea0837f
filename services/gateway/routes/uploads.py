"""``POST /api/flux/upload-image``: a user's input image, checked and stored under our name.

Refusals, each a 4xx saying why: a body over the limit is 413 (``Content-Length`` checked
first, then the bytes counted as they arrive: nothing beyond the limit is read or kept); bytes
that are not a jpg, png or webp by their content 415; an image that does not decode, or has
more pixels than ``FLUXPIPE_MAX_UPLOAD_PIXELS`` (checked before decoding), 422. Decoding and
re-encoding run in a thread, never on the event loop. The stored copy is the re-encoded image
(metadata and appended bytes gone) at ``uploads/<user digest>/flux_input_<uuid>.<ext>``, with
the original file name as metadata; a new upload is a new object, so a retry is harmless.
At most two uploads are decoded at once per gateway process, bounding memory under a burst.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Literal, cast

from fastapi import APIRouter, HTTPException, Request, status

from schemas.api import UploadedImage
from services.common.images import NotAnImage, TooManyPixels, UnsupportedImage, reencode_upload
from services.common.settings import Settings
from services.common.storage import Storage
from services.common.urls import upload_key
from services.gateway.admission import UploadingUser
from services.gateway.deps import SettingsDep
from services.gateway.upload_stream import read_file_field

router = APIRouter(prefix="/api/flux", tags=["uploads"])

# Decoding a 25 Mpx image takes ~100 MB; two at a time keeps a burst of uploads bounded.
_DECODING = asyncio.Semaphore(2)

_MULTIPART = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            }
        },
    }
}


@router.post(
    "/upload-image",
    status_code=status.HTTP_201_CREATED,
    response_model=UploadedImage,
    openapi_extra=_MULTIPART,
)
async def upload_image(request: Request, user: UploadingUser, settings: SettingsDep) -> UploadedImage:
    """Store an input image (multipart field ``file``; jpg, png or webp, at most 10 MB) and
    return its URL for ``image_url`` / ``image_urls``. Counts against the caller's upload rate
    limit (``FLUXPIPE_RATE_UPLOADS``)."""
    received = await read_file_field(request, "file", settings.max_upload_bytes)
    return await store_input_image(
        settings,
        user.user_id,
        received.data,
        received.filename,
        field="file",
        storage=request.app.state.storage,
    )


async def store_input_image(
    settings: Settings, user_id: str, raw: bytes, filename: str | None, *, field: str, storage: Storage
) -> UploadedImage:
    """Check, re-encode and store one input image of ``user_id`` (the upload route's rules, also
    for ``/v1/images/edits``); ``HTTPException`` naming ``field`` and why when it is refused."""
    if not raw:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"{field}: the file is empty")
    if len(raw) > settings.max_upload_bytes:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"{field}: larger than {settings.max_upload_bytes // (1024 * 1024)} MB",
        )
    try:
        async with _DECODING:
            data, info = await asyncio.to_thread(reencode_upload, raw, settings.max_upload_pixels)
    except UnsupportedImage as exc:
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, f"{field}: {exc}") from None
    except (TooManyPixels, NotAnImage) as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"{field}: {exc}") from None
    key = upload_key(user_id, f"flux_input_{uuid.uuid4().hex}.{info.extension}")
    name = (filename or "")[:255]
    url = await storage.put(key, data, info.content_type, {"source": "flux_input", "original_filename": name})
    return UploadedImage(
        url=url,
        key=key,
        content_type=info.content_type,
        type=cast(Literal["jpeg", "png", "webp"], info.format.lower()),
        width=info.width,
        height=info.height,
        size=len(data),
        filename=name or None,
    )
