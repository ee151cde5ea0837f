"""Fetching a request's input images as fal does: http(s) URLs are downloaded (redirects
followed, at most 20 MB), data URIs are decoded inline. Anything else, or a download that fails,
is fal's `file_download_error`; bytes that are not an image are `image_load_error` (both 422s
located at the field that named the image)."""

from __future__ import annotations

import base64
import binascii
import io
from urllib.parse import unquote_to_bytes

import httpx
from PIL import Image

from services.simulator.catalog import Loc, fal_error

MAX_DOWNLOAD_BYTES = 20 * 1024 * 1024


class InputFailure(Exception):
    """An input image could not be had; `entry` is the fal error entry to answer with."""

    def __init__(self, entry: dict) -> None:
        super().__init__(entry["msg"])
        self.entry = entry


def _decode_data_uri(uri: str) -> bytes:
    header, sep, payload = uri[5:].partition(",")
    if not sep:
        raise ValueError("data URI without payload")
    if header.endswith(";base64"):
        return base64.b64decode(payload, validate=True)
    return unquote_to_bytes(payload)


async def download(http: httpx.AsyncClient, url: str, loc: Loc) -> bytes:
    """The bytes behind an image URL or data URI."""
    if url.startswith("data:"):
        try:
            return _decode_data_uri(url)
        except (ValueError, binascii.Error) as exc:
            raise InputFailure(fal_error(loc, "Image load error", "image_load_error", url[:64])) from exc
    failure = InputFailure(fal_error(loc, "File download error", "file_download_error", url))
    if not url.startswith(("http://", "https://")):
        raise failure
    try:
        async with http.stream("GET", url) as response:
            if response.status_code != 200:
                raise failure
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > MAX_DOWNLOAD_BYTES:
                    raise failure
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as exc:
        raise failure from exc


def load_image(data: bytes, loc: Loc, source: str, *, decode: bool = True) -> Image.Image:
    """The image in `data`; with `decode=False` only its header is read (size, format)."""
    try:
        opened = Image.open(io.BytesIO(data))
        if not decode:
            return opened
        with opened:
            opened.load()
            return opened.convert("RGB")
    except Exception as exc:
        raise InputFailure(fal_error(loc, "Image load error", "image_load_error", source[:64])) from exc
