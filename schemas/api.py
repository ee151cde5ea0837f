"""The gateway's HTTP contract: request and response models (never reused as events or rows)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.catalog import ASPECT_RATIOS, MODELS, TEXT_TO_IMAGE_MODELS, Family, Mode
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
    generation_time: float | None = None
    queue_position: int | None = None
    error_message: str | None = None
    storage_error: str | None = None
    created_at: datetime
    updated_at: datetime | None = None
    completed_at: datetime | None = None
    retry_of: str | None = Field(None, description="the task this one retries")
    retried_by: list[str] = Field([], description="tasks made by retrying this one, oldest first")


class HistoryPage(BaseModel):
    items: list[TaskOut]
    total: int
    page: int
    limit: int
