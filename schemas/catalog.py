"""The eleven FLUX models on fal.ai: what each accepts and how our parameters map onto it.

Source: shared/fal-protocol.md §7. One declaration per model (``ModelSpec``) is the single
source of truth: ``params_model(spec)`` turns it into a frozen pydantic model that validates
a job for that model (unknown fields refused, ranges and enums enforced), renders the schema
``GET /api/flux/models`` serves, and tells ``build_fal_input`` which fields fal receives.
Pure data and pure functions; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model


class Mode(StrEnum):
    TEXT_TO_IMAGE = "text_to_image"
    IMAGE_TO_IMAGE = "image_to_image"
    REDUX = "redux"
    KONTEXT_EDIT = "kontext_edit"
    MULTI_IMAGE = "multi_image"


class Family(StrEnum):
    FLUX1 = "flux1"
    KONTEXT = "kontext"


ASPECT_RATIOS = ("21:9", "16:9", "4:3", "3:2", "1:1", "2:3", "3:4", "9:16", "9:21")
AspectRatio = Literal["21:9", "16:9", "4:3", "3:2", "1:1", "2:3", "3:4", "9:16", "9:21"]
SafetyTolerance = Literal["1", "2", "3", "4", "5", "6"]
OutputFormat = Literal["jpeg", "png"]

MAX_MULTI_IMAGES = 4  # fal documents no upper bound for kontext multi; four keeps requests sane

# fal's named sizes for FLUX.1 models, by the aspect ratio our API speaks.
_FLUX1_IMAGE_SIZE = {
    "1:1": "square_hd",
    "4:3": "landscape_4_3",
    "3:4": "portrait_4_3",
    "16:9": "landscape_16_9",
    "9:16": "portrait_16_9",
}


@dataclass(frozen=True)
class ModelSpec:
    id: str
    name: str
    mode: Mode
    family: Family
    default_steps: int | None = None
    max_steps: int | None = None
    min_steps: int = 1
    guidance: bool = True
    prompt_required: bool = True

    @property
    def needs_image(self) -> bool:
        return self.mode is not Mode.TEXT_TO_IMAGE

    @property
    def min_images(self) -> int:
        return {Mode.TEXT_TO_IMAGE: 0, Mode.MULTI_IMAGE: 2}.get(self.mode, 1)

    @property
    def max_images(self) -> int:
        return {Mode.TEXT_TO_IMAGE: 0, Mode.MULTI_IMAGE: MAX_MULTI_IMAGES}.get(self.mode, 1)

    @property
    def task_type(self) -> Literal["text_to_image", "image_to_image"]:
        return "text_to_image" if self.mode is Mode.TEXT_TO_IMAGE else "image_to_image"


MODELS: dict[str, ModelSpec] = {
    m.id: m
    for m in (
        ModelSpec("fal-ai/flux-1/dev", "FLUX.1 Dev", Mode.TEXT_TO_IMAGE, Family.FLUX1, 28, 50),
        ModelSpec(
            "fal-ai/flux-1/dev/image-to-image",
            "FLUX.1 Dev image-to-image",
            Mode.IMAGE_TO_IMAGE,
            Family.FLUX1,
            40,
            50,
            min_steps=10,
        ),
        ModelSpec(
            "fal-ai/flux-1/dev/redux",
            "FLUX.1 Dev Redux",
            Mode.REDUX,
            Family.FLUX1,
            28,
            50,
            prompt_required=False,
        ),
        ModelSpec("fal-ai/flux-1/schnell", "FLUX.1 Schnell", Mode.TEXT_TO_IMAGE, Family.FLUX1, 4, 12),
        ModelSpec(
            "fal-ai/flux-1/schnell/redux",
            "FLUX.1 Schnell Redux",
            Mode.REDUX,
            Family.FLUX1,
            4,
            12,
            guidance=False,
            prompt_required=False,
        ),
        ModelSpec("fal-ai/flux-pro/kontext", "FLUX.1 Pro (Kontext)", Mode.KONTEXT_EDIT, Family.KONTEXT),
        ModelSpec("fal-ai/flux-pro/kontext/max", "FLUX.1 Pro Max", Mode.KONTEXT_EDIT, Family.KONTEXT),
        ModelSpec(
            "fal-ai/flux-pro/kontext/max/multi", "FLUX.1 Pro Max Multi", Mode.MULTI_IMAGE, Family.KONTEXT
        ),
        ModelSpec(
            "fal-ai/flux-pro/kontext/max/text-to-image",
            "FLUX.1 Pro Max T2I",
            Mode.TEXT_TO_IMAGE,
            Family.KONTEXT,
        ),
        ModelSpec("fal-ai/flux-pro/kontext/multi", "FLUX.1 Pro Multi", Mode.MULTI_IMAGE, Family.KONTEXT),
        ModelSpec(
            "fal-ai/flux-pro/kontext/text-to-image", "FLUX.1 Pro T2I", Mode.TEXT_TO_IMAGE, Family.KONTEXT
        ),
    )
}

TEXT_TO_IMAGE_MODELS = tuple(m.id for m in MODELS.values() if m.mode is Mode.TEXT_TO_IMAGE)
IMAGE_MODELS = tuple(m.id for m in MODELS.values() if m.needs_image)


def _printable(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters (\\u0000)")
    return value


Prompt = Annotated[
    str,
    Field(min_length=1, max_length=4000, description="what to draw or change"),
    AfterValidator(_printable),
]
ImageUrl = Annotated[
    str,
    Field(
        min_length=1,
        max_length=2048,
        description="an upload of yours (POST /api/flux/upload-image) or a public https URL",
    ),
]


class ModelParams(BaseModel):
    """Base of every per-model parameter model: frozen, unknown fields refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


def _fields(spec: ModelSpec) -> dict[str, Any]:
    """The fields ``spec`` takes, in our names, as ``create_model`` field definitions."""
    fields: dict[str, Any] = {}
    if spec.mode is not Mode.REDUX:
        fields["prompt"] = (Prompt, ...)
    if spec.mode is Mode.MULTI_IMAGE:
        fields["image_urls"] = (
            list[ImageUrl],
            Field(min_length=spec.min_images, max_length=spec.max_images, description="the input images"),
        )
    elif spec.needs_image:
        fields["image_url"] = (ImageUrl, ...)
    fields["num_images"] = (int, Field(1, ge=1, le=4, description="how many images to make"))
    if spec.mode is Mode.IMAGE_TO_IMAGE and spec.family is Family.FLUX1:
        fields["strength"] = (
            float,
            Field(0.95, ge=0.01, le=1, description="how far to move from the input image"),
        )
    elif spec.mode is Mode.KONTEXT_EDIT or spec.mode is Mode.MULTI_IMAGE:
        fields["aspect_ratio"] = (
            AspectRatio | None,
            Field(None, description="the output's shape; the input image's shape when omitted"),
        )
    else:
        fields["aspect_ratio"] = (AspectRatio, Field("1:1", description="the output's shape"))
    if spec.guidance:
        fields["guidance_scale"] = (float, Field(3.5, ge=1, le=20, description="how closely to follow"))
    if spec.family is Family.FLUX1:
        fields["num_inference_steps"] = (
            int,
            Field(spec.default_steps, ge=spec.min_steps, le=spec.max_steps, description="denoising steps"),
        )
    else:
        fields["safety_tolerance"] = (
            SafetyTolerance,
            Field("2", description="1 is the strictest, 6 the most permissive"),
        )
    fields["seed"] = (int | None, Field(None, ge=0, le=2**32 - 1, description="random when omitted"))
    fields["output_format"] = (OutputFormat, Field("jpeg"))
    return fields


@cache
def params_model(spec: ModelSpec) -> type[ModelParams]:
    """The pydantic model of ``spec``'s parameters: validation, schema and fal's field list."""
    name = "".join(part.title() for part in spec.id.split("/", 1)[1].replace("-", "/").split("/")) + "Params"
    model: type[ModelParams] = create_model(
        name, __base__=ModelParams, __doc__=f"{spec.name} ({spec.id})", **_fields(spec)
    )
    return model


def flux1_image_size(aspect_ratio: str) -> str | dict[str, int]:
    """fal's ``image_size`` for an aspect ratio: a named size, else about one megapixel in
    multiples of 16 (fal has no named size for 21:9, 3:2, 2:3 and 9:21)."""
    if aspect_ratio in _FLUX1_IMAGE_SIZE:
        return _FLUX1_IMAGE_SIZE[aspect_ratio]
    w, h = (int(x) for x in aspect_ratio.split(":"))
    scale = (1024 * 1024 / (w * h)) ** 0.5
    return {"width": round(w * scale / 16) * 16, "height": round(h * scale / 16) * 16}


def build_fal_input(spec: ModelSpec, params: dict[str, Any]) -> dict[str, Any]:
    """fal's input for ``spec`` from a task's parameters, keeping only what the model accepts.

    ``params`` holds our names (prompt, image_urls, num_images, aspect_ratio, guidance_scale,
    num_inference_steps, seed, safety_tolerance, strength, output_format); ``None`` means
    "the model's default" and is left out. Which fields a model takes comes from
    ``params_model(spec)``; FLUX.1's ``aspect_ratio`` becomes fal's ``image_size``.
    """
    images = list(params.get("image_urls") or [])
    ours = {**params, "image_url": images[0] if images else None, "image_urls": images or None}
    out: dict[str, Any] = {}
    for name in params_model(spec).model_fields:
        value = ours.get(name)
        if value is None:
            continue
        if name == "aspect_ratio" and spec.family is Family.FLUX1:
            out["image_size"] = flux1_image_size(value)
        else:
            out[name] = value
    return out
