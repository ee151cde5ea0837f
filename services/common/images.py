"""Checking image bytes: what they really are, decoded in full, never trusted by name."""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageOps

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
    """Identify and fully decode ``data``; raise ``NotAnImage`` with the reason otherwise.

    A JPEG is decoded in draft mode (its blocks at 1/8 scale): every byte of its entropy-coded
    data is still read, so a truncated or corrupt file fails as before, at a third of the CPU
    (docs/BENCHMARKS.md). CPU-bound: call it off the event loop (``asyncio.to_thread``).
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in FORMATS:
                raise NotAnImage(f"unsupported image format {img.format}")
            if img.width * img.height > MAX_PIXELS:
                raise NotAnImage(f"image too large: {img.width}x{img.height} pixels")
            size = img.size
            if img.format == "JPEG":
                img.draft(img.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
            img.load()
            content_type, extension = FORMATS[img.format]
            return ImageInfo(img.format, content_type, extension, *size)
    except NotAnImage:
        raise
    except Exception as exc:
        raise NotAnImage(f"not a decodable image: {exc}") from exc


UPLOAD_FORMATS = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp"}


class UnsupportedImage(NotAnImage):
    """The bytes are not a jpg, png or webp (by content, whatever the name says)."""


class TooManyPixels(NotAnImage):
    """The image declares more pixels than we decode (a decompression bomb, or just too big)."""


def sniff(head: bytes) -> str | None:
    """The upload format from the first bytes (magic numbers), or ``None``."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def reencode_upload(data: bytes, max_pixels: int) -> tuple[bytes, ImageInfo]:
    """A user's upload checked and re-encoded: the format decided by its magic bytes, the
    pixel count checked before decoding, decoded in full, then saved afresh, so metadata
    (EXIF, ICC, text chunks) and anything appended to the file are dropped. EXIF orientation
    is applied first, so the picture looks as it did. CPU-bound: run it in a thread."""
    fmt = sniff(data[:16])
    if fmt is None:
        raise UnsupportedImage("the file is not a jpg, png or webp image (judged by its content)")
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as img:
            if img.width * img.height > max_pixels:
                size = f"{img.width}x{img.height}"
                raise TooManyPixels(f"the image has too many pixels: {size}; at most {max_pixels} allowed")
            img.load()
            picture = ImageOps.exif_transpose(img)
    except NotAnImage:
        raise
    except Image.DecompressionBombError as exc:
        raise TooManyPixels(f"the image has too many pixels: {exc}") from exc
    except Exception as exc:
        raise NotAnImage(f"the {fmt.lower()} image could not be decoded: {exc}") from exc
    if fmt == "JPEG" and picture.mode not in ("RGB", "L"):
        picture = picture.convert("RGB")
    elif picture.mode not in ("RGB", "RGBA", "L", "LA"):
        picture = picture.convert("RGBA" if "A" in picture.mode or "transparency" in picture.info else "RGB")
    clean = Image.new(picture.mode, picture.size)
    clean.paste(picture)
    out = io.BytesIO()
    if fmt == "PNG":
        clean.save(out, "PNG", optimize=False)
    else:
        clean.save(out, fmt, quality=95)
    content_type, extension = FORMATS[fmt]
    return out.getvalue(), ImageInfo(fmt, content_type, extension, clean.width, clean.height)
