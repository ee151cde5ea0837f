"""The gateway's HTTP contract: request and response models (never reused as events or rows)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from schemas.catalog import (
    ASPECT_RATIOS,
    IMAGE_MODELS,
    MODELS,
    TEXT_TO_IMAGE_MODELS,
    Family,
    Mode,
    ModelParams,
    ModelSpec,
    params_model,
)
from schemas.events import TaskStatus

AspectRatio = Literal["21:9", "16:9", "4:3", "3:2", "1:1", "2:3", "3:4", "9:16", "9:21"]
assert set(AspectRatio.__args__) == set(ASPECT_RATIOS)  # type: ignore[attr-defined]


class TextToImageRequest(BaseModel):
    """A text-to-image job. Unknown fields are rejected so a typo never passes silently."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    model: str | None = Field(None, description="fal model id; the configured default when omitted")
    prompt: str = Field(min_length=1, max_length=4000)
    num_images: int = Field(1, ge=1, le=4)
    aspect_ratio: AspectRatio = "1:1"
    guidance_scale: float = Field(3.5, ge=1, le=20)
    num_inference_steps: int | None = Field(None, ge=1, le=50)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    safety_tolerance: Literal["1", "2", "3", "4", "5", "6"] = "2"
    output_format: Literal["jpeg", "png"] = "jpeg"

    @field_validator("prompt")
    @classmethod
    def _printable_prompt(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError("must not contain NUL characters (\\u0000)")
        return value

    @field_validator("model")
    @classmethod
    def _known_text_model(cls, value: str | None) -> str | None:
        if value is None:
            return None
        spec = MODELS.get(value)
        if spec is None:
            raise ValueError(
                f"unknown model {value!r}; text-to-image models: {', '.join(TEXT_TO_IMAGE_MODELS)}"
            )
        if spec.mode is not Mode.TEXT_TO_IMAGE:
            raise ValueError(
                f"model {value!r} needs an input image ({spec.mode.value}); "
                f"text-to-image models: {', '.join(TEXT_TO_IMAGE_MODELS)}"
            )
        return value

    @model_validator(mode="after")
    def _steps_in_model_range(self) -> TextToImageRequest:
        spec = MODELS.get(self.model or "")
        if spec is None or self.num_inference_steps is None:
            return self
        if spec.family is Family.KONTEXT:
            raise ValueError(f"num_inference_steps is not supported by {spec.id}")
        if spec.max_steps is not None and not spec.min_steps <= self.num_inference_steps <= spec.max_steps:
            raise ValueError(
                f"num_inference_steps must be between {spec.min_steps} and {spec.max_steps} for {spec.id}"
            )
        return self


class TaskAccepted(BaseModel):
    task_id: str
    status: TaskStatus
    model: str


class TaskOut(BaseModel):
    """A task as the frontend sees it. ``image_url`` is our stored copy when there is one."""

    id: str
    status: TaskStatus
    model: str
    task_type: str
    prompt: str | None = None
    image_url: str | None = None
    cloud_image_url: str | None = None
    provider_image_url: str | None = None
    images: list[dict[str, Any]] = []
    request_id: str | None = None
    num_images: int = 1
    aspect_ratio: str | None = None
    guidance_scale: float | None = None
    num_inference_steps: int | None = None
    seed: int | None = None
    safety_tolerance: str | None = None
    strength: float | None = None
    input_image_url: str | None = None
    input_image_urls: list[str] | None = None
    generation_time: float | None = None
    queue_position: int | None = None
    error_message: str | None = None
    storage_error: str | None = None
    created_at: datetime
    updated_at: datetime | None = None
    completed_at: datetime | None = None


class HistoryPage(BaseModel):
    items: list[TaskOut]
    total: int
    page: int
    limit: int


class ModelInfo(BaseModel):
    """One model of ``GET /api/flux/models``; ``parameters`` is the JSON Schema of its job body
    (without ``model``), generated from the catalog's declaration of the model."""

    id: str
    name: str
    mode: Mode
    family: Family
    task_type: Literal["text_to_image", "image_to_image"]
    route: str
    min_images: int
    max_images: int
    image_field: Literal["image_url", "image_urls"] | None
    parameters: dict[str, Any]


def model_info(spec: ModelSpec) -> ModelInfo:
    image_field: Literal["image_url", "image_urls"] | None = None
    if spec.needs_image:
        image_field = "image_urls" if spec.max_images > 1 else "image_url"
    return ModelInfo(
        id=spec.id,
        name=spec.name,
        mode=spec.mode,
        family=spec.family,
        task_type=spec.task_type,
        route="/api/flux/image-to-image" if spec.needs_image else "/api/flux/text-to-image",
        min_images=spec.min_images,
        max_images=spec.max_images,
        image_field=image_field,
        parameters=params_model(spec).model_json_schema(),
    )


DEFAULT_IMAGE_MODEL = "fal-ai/flux-1/dev/image-to-image"


class InvalidJob(ValueError):
    """A job refused before anything is published; ``errors`` are in pydantic's shape, with
    ``loc`` starting at ``body`` as FastAPI reports request errors."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(str(e["msg"]) for e in errors))
        self.errors = errors


def _invalid(loc: tuple[str | int, ...], msg: str, type_: str = "value_error") -> InvalidJob:
    return InvalidJob([{"loc": ("body", *loc), "msg": msg, "type": type_}])


def parse_image_job(body: Any) -> tuple[ModelSpec, ModelParams]:
    """The model and validated parameters of an ``image-to-image`` body, or ``InvalidJob``.

    ``model`` picks the model (``fal-ai/flux-1/dev/image-to-image`` when omitted); every other
    field is validated by that model's parameter model, so a field the model does not take is
    refused with the list of those it does take.
    """
    if not isinstance(body, dict):
        raise _invalid((), "the request body must be a JSON object", "model_type")
    fields = dict(body)
    model = fields.pop("model", None) or DEFAULT_IMAGE_MODEL
    allowed = ", ".join(IMAGE_MODELS)
    spec = MODELS.get(model) if isinstance(model, str) else None
    if spec is None:
        raise _invalid(("model",), f"unknown model {model!r}; image models: {allowed}")
    if not spec.needs_image:
        raise _invalid(
            ("model",),
            f"model {model!r} takes no input image; use POST /api/flux/text-to-image, "
            f"or one of the image models: {allowed}",
        )
    params = params_model(spec)
    try:
        return spec, params.model_validate(fields)
    except ValidationError as exc:
        takes = ", ".join(["model", *params.model_fields])
        errors: list[dict[str, Any]] = []
        for err in exc.errors(include_url=False):
            entry: dict[str, Any] = {"loc": ("body", *err["loc"]), "msg": err["msg"], "type": err["type"]}
            if err["type"] == "extra_forbidden":
                entry["msg"] = f"{spec.id} does not take this field; it takes {takes}"
            elif err["type"] == "missing":
                entry["msg"] = f"Field required by {spec.id}"
            errors.append(entry)
        raise InvalidJob(errors) from None


class UploadedImage(BaseModel):
    """An input image stored by ``POST /api/flux/upload-image``: re-encoded, ready for
    ``image_url`` / ``image_urls``."""

    url: str
    key: str
    content_type: str
    type: Literal["jpeg", "png", "webp"]
    width: int
    height: int
    size: int
    filename: str | None = None
