"""The eleven FLUX model ids the simulator serves, their inputs as pydantic models (§7), and the
translation of pydantic's validation errors into fal's 422 `detail` entries (§3).

Validation is the model's own: unknown keys are ignored (as fal's pydantic models do), `None` for
an optional field without a default counts as absent, booleans are strict. Error entries carry
`loc, msg, type, url` always and `ctx, input` when known; `Literal` choices are reported as fal's
`one_of` with the allowed values listed in `ctx.expected`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictBool, Tag, ValidationError

ERROR_DOCS = "https://docs.fal.ai/errors/#"
MAX_INPUT_PIXELS = 2 * 1024 * 1024

IMAGE_SIZES: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}
ASPECT_RATIOS: dict[str, float] = {
    "21:9": 21 / 9,
    "16:9": 16 / 9,
    "4:3": 4 / 3,
    "3:2": 3 / 2,
    "1:1": 1.0,
    "2:3": 2 / 3,
    "3:4": 3 / 4,
    "9:16": 9 / 16,
    "9:21": 9 / 21,
}
# ⚠ fal does not document kontext output sizes. "About one megapixel" is snapped to FLUX Kontext's
# preferred training resolutions (as listed in diffusers' PREFERRED_KONTEXT_RESOLUTIONS), width×height.
KONTEXT_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (672, 1568),
    (688, 1504),
    (720, 1456),
    (752, 1392),
    (800, 1328),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1328, 800),
    (1392, 752),
    (1456, 720),
    (1504, 688),
    (1568, 672),
)

ImageSizePreset = Literal[
    "square_hd", "square", "portrait_4_3", "portrait_16_9", "landscape_4_3", "landscape_16_9"
]
AspectRatio = Literal["21:9", "16:9", "4:3", "3:2", "1:1", "2:3", "3:4", "9:16", "9:21"]
OutputFormatChoice = Literal["jpeg", "png"]
SafetyTolerance = Literal["1", "2", "3", "4", "5", "6"]
Acceleration = Literal["none", "regular", "high"]
NumImages = Annotated[int, Field(ge=1, le=4)]
Guidance = Annotated[float, Field(ge=1, le=20)]


class ImageSize(BaseModel):
    """A custom output size. ⚠ fal documents no bounds; each side is capped at 4096 px so that a
    request cannot make the simulator allocate an unbounded canvas."""

    width: int = Field(512, ge=16, le=4096)
    height: int = Field(512, ge=16, le=4096)


_SIZE_TAGS = ("preset", "custom")


def _size_tag(value: Any) -> str:
    return "preset" if isinstance(value, str) else "custom"


ImageSizeInput = Annotated[
    Annotated[ImageSizePreset, Tag("preset")] | Annotated[ImageSize, Tag("custom")],
    Discriminator(_size_tag),
]


class _Input(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    seed: int | None = None
    sync_mode: StrictBool = False
    num_images: NumImages = 1
    output_format: OutputFormatChoice = "jpeg"


class _Flux1(_Input):
    enable_safety_checker: StrictBool = True
    acceleration: Acceleration = "regular"


class Flux1DevInput(_Flux1):
    prompt: str
    image_size: ImageSizeInput = "landscape_4_3"
    num_inference_steps: int = Field(28, ge=1, le=50)
    guidance_scale: Guidance = 3.5


class Flux1DevImageToImageInput(_Flux1):
    prompt: str
    image_url: str
    strength: float = Field(0.95, ge=0.01, le=1)
    num_inference_steps: int = Field(40, ge=10, le=50)
    guidance_scale: Guidance = 3.5


class Flux1DevReduxInput(_Flux1):
    image_url: str
    image_size: ImageSizeInput = "landscape_4_3"
    num_inference_steps: int = Field(28, ge=1, le=50)
    guidance_scale: Guidance = 3.5


class Flux1SchnellInput(_Flux1):
    prompt: str
    image_size: ImageSizeInput = "landscape_4_3"
    num_inference_steps: int = Field(4, ge=1, le=12)
    guidance_scale: Guidance = 3.5


class Flux1SchnellReduxInput(_Flux1):
    image_url: str
    image_size: ImageSizeInput = "landscape_4_3"
    num_inference_steps: int = Field(4, ge=1, le=12)


class _Kontext(_Input):
    prompt: str
    guidance_scale: Guidance = 3.5
    safety_tolerance: SafetyTolerance = "2"
    enhance_prompt: StrictBool = False


class KontextEditInput(_Kontext):
    image_url: str
    aspect_ratio: AspectRatio | None = None


class KontextMultiInput(_Kontext):
    # ⚠ the minimum length of image_urls is undocumented; an empty list is refused.
    image_urls: list[str] = Field(min_length=1)
    aspect_ratio: AspectRatio | None = None


class KontextTextToImageInput(_Kontext):
    aspect_ratio: AspectRatio = "1:1"


Sizing = Literal["image_size", "input", "aspect_ratio"]


@dataclass(frozen=True)
class CatalogModel:
    """One model id: its input model and how its output size is decided."""

    input: type[_Input]
    sizing: Sizing


MODELS: dict[str, CatalogModel] = {
    "fal-ai/flux-1/dev": CatalogModel(Flux1DevInput, "image_size"),
    "fal-ai/flux-1/dev/image-to-image": CatalogModel(Flux1DevImageToImageInput, "input"),
    "fal-ai/flux-1/dev/redux": CatalogModel(Flux1DevReduxInput, "image_size"),
    "fal-ai/flux-1/schnell": CatalogModel(Flux1SchnellInput, "image_size"),
    "fal-ai/flux-1/schnell/redux": CatalogModel(Flux1SchnellReduxInput, "image_size"),
    "fal-ai/flux-pro/kontext": CatalogModel(KontextEditInput, "aspect_ratio"),
    "fal-ai/flux-pro/kontext/max": CatalogModel(KontextEditInput, "aspect_ratio"),
    "fal-ai/flux-pro/kontext/multi": CatalogModel(KontextMultiInput, "aspect_ratio"),
    "fal-ai/flux-pro/kontext/max/multi": CatalogModel(KontextMultiInput, "aspect_ratio"),
    "fal-ai/flux-pro/kontext/text-to-image": CatalogModel(KontextTextToImageInput, "aspect_ratio"),
    "fal-ai/flux-pro/kontext/max/text-to-image": CatalogModel(KontextTextToImageInput, "aspect_ratio"),
}

Loc = tuple[str | int, ...]
_ABSENT: Any = object()


def fal_error(
    loc: Loc, msg: str, type_: str, value: Any = _ABSENT, ctx: dict[str, Any] | None = None
) -> dict:
    """One entry of fal's `detail` list: `loc, msg, type, url` always, `ctx, input` when known."""
    entry: dict[str, Any] = {"loc": ["body", *loc], "msg": msg, "type": type_, "url": ERROR_DOCS + type_}
    if ctx is not None:
        entry["ctx"] = ctx
    if value is not _ABSENT:
        entry["input"] = value
    return entry


def _fal_entry(error: Any) -> dict:
    loc = tuple(error["loc"])
    if len(loc) >= 2 and loc[0] == "image_size" and loc[1] in _SIZE_TAGS:
        loc = (loc[0], *loc[2:])
    type_, msg, ctx = error["type"], error["msg"], error.get("ctx")
    if type_ == "literal_error":
        type_ = "one_of"
        ctx = {"expected": re.findall(r"'([^']*)'", str((ctx or {}).get("expected", "")))}
    elif type_ == "too_short":
        type_ = "sequence_too_short"
        msg = f"Sequence should have at least {(ctx or {}).get('min_length')} items"
    elif type_ == "model_attributes_type" and loc[:1] == ("image_size",):
        type_, msg = "model_type", "Input should be a valid dictionary or instance of ImageSize"
        ctx = None
    if ctx is not None:
        ctx = {k: v for k, v in ctx.items() if isinstance(v, str | int | float | bool | list)}
    return fal_error(loc, msg, type_, error.get("input", _ABSENT), ctx or None)


def validate(model: CatalogModel, arguments: dict[str, Any]) -> tuple[_Input | None, list[dict]]:
    """The model's parsed input, or every violation as fal reports it."""
    cleaned = {k: v for k, v in arguments.items() if not (v is None and k in _NULLABLE[model.input])}
    try:
        return model.input.model_validate(cleaned), []
    except ValidationError as exc:
        errors = sorted(exc.errors(include_url=False), key=lambda e: _FIELD_ORDER.get(str(e["loc"][0]), 99))
        return None, [_fal_entry(error) for error in errors]


# The order fal's own input models declare their fields in, which is the order of its errors.
_FIELD_ORDER = {
    name: rank
    for rank, name in enumerate(
        (
            "prompt",
            "image_url",
            "image_urls",
            "strength",
            "image_size",
            "num_inference_steps",
            "guidance_scale",
            "seed",
            "sync_mode",
            "num_images",
            "enable_safety_checker",
            "output_format",
            "safety_tolerance",
            "enhance_prompt",
            "aspect_ratio",
            "acceleration",
        )
    )
}


_NULLABLE: dict[type[_Input], frozenset[str]] = {
    entry.input: frozenset(
        name
        for name, info in entry.input.model_fields.items()
        if not info.is_required() and info.default is None
    )
    for entry in MODELS.values()
}


def image_sources(values: _Input) -> list[tuple[Loc, str]]:
    """The input image URLs of a request, with the location an error about each one names."""
    sources: list[tuple[Loc, str]] = []
    if isinstance(url := getattr(values, "image_url", None), str):
        sources.append((("image_url",), url))
    for i, item in enumerate(getattr(values, "image_urls", None) or []):
        sources.append((("image_urls", i), item))
    return sources


def _kontext_size(ratio: float) -> tuple[int, int]:
    return min(KONTEXT_RESOLUTIONS, key=lambda wh: abs(math.log(wh[0] / wh[1]) - math.log(ratio)))


def _input_size(width: int, height: int) -> tuple[int, int]:
    """⚠ Image-to-image keeps the input's size, scaled down to at most 2 MP and to multiples of 16."""
    scale = min(1.0, math.sqrt(MAX_INPUT_PIXELS / (width * height)))
    return max(16, int(width * scale) // 16 * 16), max(16, int(height * scale) // 16 * 16)


def output_size(model: CatalogModel, values: _Input, input_sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The width and height of every output image of a request."""
    if model.sizing == "input":
        return _input_size(*input_sizes[0])
    if model.sizing == "aspect_ratio":
        ratio = getattr(values, "aspect_ratio", None)
        if ratio:
            return _kontext_size(ASPECT_RATIOS[ratio])
        # ⚠ without aspect_ratio a kontext edit follows its (first) input image's shape.
        width, height = input_sizes[0]
        return _kontext_size(width / height)
    size = values.image_size  # type: ignore[attr-defined]
    if isinstance(size, ImageSize):
        return size.width, size.height
    return IMAGE_SIZES[size]
