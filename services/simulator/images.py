"""Deterministic placeholder images for the fal simulator.

Invariant: `render_image` is a pure function of its arguments. The same prompt, seed, index, size,
format and base image always produce the same bytes, so a caller can rely on reproducible output
(as with a real diffusion model given a fixed seed). The drawing is cheap: a two-colour gradient, a
handful of shapes and a short caption, all chosen from a hash of the prompt and seed. Input images
show in the output: the first is blended under the drawing, and a framed thumbnail of each one is
drawn along the bottom-right corner, in input order.

`predrawn` serves benchmark mode: one image per size and format, drawn once and then reused.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from functools import lru_cache
from typing import Literal

from PIL import Image, ImageDraw, ImageFont

OutputFormat = Literal["jpeg", "png"]

CONTENT_TYPES: dict[OutputFormat, str] = {"jpeg": "image/jpeg", "png": "image/png"}
EXTENSIONS: dict[OutputFormat, str] = {"jpeg": "jpg", "png": "png"}

_ORIENTATIONS = (
    None,
    Image.Transpose.ROTATE_90,
    Image.Transpose.ROTATE_180,
    Image.Transpose.ROTATE_270,
)
_CAPTION_CHARS = 48
_THUMBNAIL_FRACTION = 5
_THUMBNAIL_MARGIN = 6


def _gradient(width: int, height: int, start: tuple[int, int, int], end: tuple[int, int, int], turn: int):
    """A linear gradient from `start` to `end`, in one of four directions."""
    ramp = Image.linear_gradient("L")
    orientation = _ORIENTATIONS[turn % 4]
    if orientation is not None:
        ramp = ramp.transpose(orientation)
    ramp = ramp.resize((width, height), Image.Resampling.BILINEAR)
    bands = [
        ramp.point([round(a + (b - a) * v / 255) for v in range(256)])
        for a, b in zip(start, end, strict=True)
    ]
    return Image.merge("RGB", bands)


def _shapes(canvas: Image.Image, digest: bytes) -> None:
    """Draw 3–6 translucent shapes whose kind, place, size and colour come from `digest`."""
    width, height = canvas.size
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    count = 3 + digest[6] % 4
    for i in range(count):
        b = digest[7 + i * 4 : 11 + i * 4]
        cx, cy = b[0] * width // 255, b[1] * height // 255
        radius = max(8, (12 + b[2] // 2) * min(width, height) // 640)
        colour = (b[3], b[2] ^ b[0], b[1] ^ b[3], 150)
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        kind = b[2] % 3
        if kind == 0:
            draw.ellipse(box, fill=colour)
        elif kind == 1:
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon(
                [(cx, cy - radius), (cx + radius, cy + radius), (cx - radius, cy + radius)], fill=colour
            )
    canvas.paste(overlay, (0, 0), overlay)


def _caption(canvas: Image.Image, prompt: str, seed: int) -> None:
    text = prompt if len(prompt) <= _CAPTION_CHARS else prompt[: _CAPTION_CHARS - 1] + "…"
    label = f"{text}  #{seed}".encode("ascii", "replace").decode("ascii")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default_imagefont()
    left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
    draw.rectangle((4, 4, right - left + 12, bottom - top + 12), fill=(0, 0, 0))
    draw.text((8, 8), label, fill=(255, 255, 255), font=font)


def _thumbnails(canvas: Image.Image, inputs: Sequence[Image.Image]) -> None:
    """Each input, scaled into a box a fifth of the canvas's shorter side, framed in white, laid
    from the bottom-right corner leftwards (wrapping upwards when they do not fit)."""
    width, height = canvas.size
    box = max(8, min(width, height) // _THUMBNAIL_FRACTION)
    step = box + _THUMBNAIL_MARGIN
    per_row = max(1, (width - _THUMBNAIL_MARGIN) // step)
    draw = ImageDraw.Draw(canvas)
    for i, source in enumerate(inputs):
        thumb = source.convert("RGB")
        thumb.thumbnail((box, box), Image.Resampling.BILINEAR)
        right = width - _THUMBNAIL_MARGIN - (i % per_row) * step
        bottom = height - _THUMBNAIL_MARGIN - (i // per_row) * step
        left, top = right - thumb.width, bottom - thumb.height
        draw.rectangle((left - 2, top - 2, right + 1, bottom + 1), outline=(255, 255, 255), width=2)
        canvas.paste(thumb, (left, top))


def render_image(
    *,
    prompt: str,
    seed: int,
    index: int,
    width: int,
    height: int,
    output_format: OutputFormat,
    inputs: Sequence[Image.Image] = (),
) -> bytes:
    """Encode one `width`×`height` image for (`prompt`, `seed`, `index`) as JPEG or PNG.

    `inputs` (image-to-image, redux, kontext edits, multi): the first is resized and blended under
    the drawing, and each one gets a thumbnail, so the output visibly depends on every input.
    """
    digest = hashlib.sha256(f"{prompt}\x00{seed}\x00{index}".encode()).digest()
    canvas = _gradient(
        width, height, (digest[0], digest[1], digest[2]), (digest[3], digest[4], digest[5]), digest[6]
    )
    if inputs:
        resized = inputs[0].convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
        canvas = Image.blend(canvas, resized, 0.6)
    _shapes(canvas, digest)
    _caption(canvas, prompt, seed)
    if inputs:
        _thumbnails(canvas, inputs)
    buffer = io.BytesIO()
    if output_format == "png":
        canvas.save(buffer, format="PNG", compress_level=1)
    else:
        canvas.save(buffer, format="JPEG", quality=88)
    return buffer.getvalue()


@lru_cache(maxsize=64)
def predrawn(width: int, height: int, output_format: OutputFormat) -> bytes:
    """The benchmark image of a size and format: drawn on first use, then the same bytes."""
    return render_image(
        prompt="benchmark", seed=0, index=0, width=width, height=height, output_format=output_format
    )
