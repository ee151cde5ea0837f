"""Checking image bytes: what they really are, decoded in full, never trusted by name."""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

FORMATS = {"JPEG": ("image/jpeg", "jpg"), "PNG": ("image/png", "png"), "WEBP": ("image/webp", "webp")}
MAX_PIXELS = 40_000_000


class NotAnImage(ValueError):
    pass


@dataclass(frozen=True)
class ImageInfo:
    format: str
    content_type: str
    extension: str
    width: int
    height: int


def inspect_image(data: bytes) -> ImageInfo:
    """Identify and fully decode ``data``; raise ``NotAnImage`` with the reason otherwise."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in FORMATS:
                raise NotAnImage(f"unsupported image format {img.format}")
            if img.width * img.height > MAX_PIXELS:
                raise NotAnImage(f"image too large: {img.width}x{img.height} pixels")
            img.load()
            content_type, extension = FORMATS[img.format]
            return ImageInfo(img.format, content_type, extension, img.width, img.height)
    except NotAnImage:
        raise
    except Exception as exc:
        raise NotAnImage(f"not a decodable image: {exc}") from exc
