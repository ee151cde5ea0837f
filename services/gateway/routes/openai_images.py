"""``/v1``: the OpenAI images API, so Open WebUI (and any OpenAI client) uses fluxpipe unchanged.

Open WebUI's image engine cannot poll: it posts ``/images/generations`` (JSON) or
``/images/edits`` (multipart, ``image`` or ``image[]``) and expects the images in the answer.
Each request becomes an ordinary task (the same ``TaskRequested``, events, read model and
history as ``/api/flux``), and the answer waits for that task's story to end, up to
``FLUXPIPE_OPENAI_WAIT`` seconds, by following the task's subjects on JetStream.

Invariants:
- Errors are in OpenAI's shape, ``{"error": {"message", "type", "code"}}``, whatever raised
  them (authentication, validation, the pipeline).
- ``model`` is one of the eleven ids or an alias (``FLUXPIPE_OPENAI_MODEL_ALIASES``; ``""`` and
  the DALL·E / gpt-image names map to the default); ``size`` becomes the nearest aspect ratio
  the model speaks; ``n`` becomes ``num_images``; extra parameters a model does not take are
  ignored (an Open WebUI admin sets them once for every model), those it takes are validated.
- A task that has not ended when the wait runs out is not abandoned: it goes on, and the
  error names its id so it can be found in the history.
"""

from __future__ import annotations

import base64
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from datetime import timedelta
from typing import Any, Literal

import httpx
from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.catalog import ASPECT_RATIOS, MODELS, Family, Mode
from schemas.events import (
    FluxEvent,
    ImagesStored,
    TaskCancelled,
    TaskCompleted,
    TaskFailed,
    TaskRequested,
    TaskRequestedData,
    utcnow,
)
from services.common.bus import Bus
from services.common.settings import Settings
from services.common.storage import Storage, StorageError
from services.gateway.deps import BusDep, CurrentUser, SettingsDep, StorageDep

log = logging.getLogger(__name__)

OPENAI_NAMES = ("", "dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1.5", "gpt-image-1-mini")
STORY_END = ("stored", "storage_failed", "failed", "cancelled")


class OpenAIError(Exception):
    def __init__(self, status_code: int, message: str, type_: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status_code, self.message, self.type, self.code = status_code, message, type_, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "code": self.code, "param": None}}
        return JSONResponse(status_code=self.status_code, content=body)


def _describe(exc: RequestValidationError | ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


class OpenAIRoute(APIRoute):
    """Every error of these routes, also from dependencies (401) and validation, as OpenAI's."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except OpenAIError as exc:
                return exc.response()
            except RequestValidationError as exc:
                return OpenAIError(400, _describe(exc), "invalid_request_error", "invalid_value").response()
            except HTTPException as exc:
                kind = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
                message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
                error = OpenAIError(
                    exc.status_code, message, kind.get(exc.status_code, "invalid_request_error")
                )
                response = error.response()
                for key, value in (exc.headers or {}).items():
                    response.headers[key] = value
                return response

        return handle


router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)


class GenerationRequest(BaseModel):
    """OpenAI's ``/images/generations`` body, plus the FLUX parameters an admin may add."""

    model_config = ConfigDict(extra="allow")

    prompt: str = Field(min_length=1, max_length=4000)
    model: str | None = None
    n: int = Field(1, ge=1, le=4)
    size: str | None = None
    response_format: Literal["b64_json", "url"] = Field(
        "b64_json",
        description="b64_json when absent, as gpt-image models answer: a client such as Open WebUI "
        "need not reach our storage (it refuses private addresses) to get the image",
    )


# Our parameter names, and the other names an OpenAI-style client may send them under.
PASSTHROUGH: dict[str, tuple[str, ...]] = {
    "seed": ("seed",),
    "guidance_scale": ("guidance_scale", "guidance"),
    "num_inference_steps": ("num_inference_steps", "steps"),
    "safety_tolerance": ("safety_tolerance", "safety"),
    "strength": ("strength",),
    "output_format": ("output_format",),
    "aspect_ratio": ("aspect_ratio",),
}


class FluxParams(BaseModel):
    """The extra parameters, validated with the same limits as ``/api/flux``."""

    model_config = ConfigDict(extra="forbid")

    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    guidance_scale: float | None = Field(None, ge=1, le=20)
    num_inference_steps: int | None = Field(None, ge=1, le=50)
    safety_tolerance: Literal["1", "2", "3", "4", "5", "6"] | None = None
    strength: float | None = Field(None, gt=0, le=1)
    output_format: Literal["jpeg", "png"] | None = None
    aspect_ratio: Literal["21:9", "16:9", "4:3", "3:2", "1:1", "2:3", "3:4", "9:16", "9:21"] | None = None


def aliases(settings: Settings) -> dict[str, str]:
    table = {name: settings.default_model for name in OPENAI_NAMES}
    table.update(settings.openai_model_aliases)
    return table


def resolve_model(settings: Settings, requested: str | None) -> str:
    name = (requested or "").strip()
    if name in MODELS:
        return name
    table = aliases(settings)
    if name in table:
        return table[name]
    raise OpenAIError(
        404,
        f"model {name!r} does not exist; use one of {', '.join(MODELS)} or an alias ({', '.join(table)})",
        "invalid_request_error",
        "model_not_found",
    )


def nearest_aspect_ratio(size: str | None) -> str | None:
    """``"1024x576"`` → ``"16:9"``; ``None`` for ``""``, ``"auto"`` or no size."""
    if not size or size == "auto":
        return None
    try:
        width, height = (int(part) for part in size.lower().split("x"))
        if width <= 0 or height <= 0:
            raise ValueError
    except ValueError:
        raise OpenAIError(
            400, f"size {size!r} is not WIDTHxHEIGHT (e.g. 1024x1024) or 'auto'", "invalid_request_error"
        ) from None
    target = width / height

    def ratio(name: str) -> float:
        w, h = (int(x) for x in name.split(":"))
        return w / h

    return min(ASPECT_RATIOS, key=lambda name: abs(ratio(name) - target))


def flux_params(extra: dict[str, Any], model: str) -> dict[str, Any]:
    """The extra parameters this model takes, under our names, validated."""
    spec = MODELS[model]
    takes = {"seed", "output_format"}
    if spec.guidance:
        takes.add("guidance_scale")
    if spec.family is Family.FLUX1:
        takes.add("num_inference_steps")
        if spec.mode is Mode.IMAGE_TO_IMAGE:
            takes.add("strength")
        else:
            takes.add("aspect_ratio")
    else:
        takes |= {"safety_tolerance", "aspect_ratio"}
    picked: dict[str, Any] = {}
    for ours, names in PASSTHROUGH.items():
        for name in names:
            if name in extra and ours in takes and extra[name] is not None:
                picked[ours] = extra[name]
                break
    try:
        params = FluxParams.model_validate(picked)
    except ValidationError as exc:
        raise OpenAIError(400, _describe(exc), "invalid_request_error", "invalid_value") from exc
    steps = params.num_inference_steps
    if steps is not None and spec.max_steps is not None and not spec.min_steps <= steps <= spec.max_steps:
        raise OpenAIError(
            400,
            f"num_inference_steps must be between {spec.min_steps} and {spec.max_steps} for {model}",
            "invalid_request_error",
            "invalid_value",
        )
    return params.model_dump(exclude_none=True)


def task_data(
    settings: Settings, model: str, prompt: str, n: int, size: str | None, extra: dict[str, Any]
) -> TaskRequestedData:
    spec = MODELS[model]
    params = flux_params(extra, model)
    ratio = nearest_aspect_ratio(size)
    if ratio is not None and "aspect_ratio" not in params and not spec.needs_image:
        params["aspect_ratio"] = ratio
    if spec.family is Family.FLUX1:
        params.setdefault("num_inference_steps", spec.default_steps)
    params.setdefault("aspect_ratio", None if spec.needs_image else "1:1")
    return TaskRequestedData(model=model, task_type="text_to_image", prompt=prompt, num_images=n, **params)


async def run_task(bus: Bus, settings: Settings, task_id: str, user_id: str, data: TaskRequestedData) -> None:
    await bus.publish(TaskRequested(task_id=task_id, user_id=user_id, data=data))


async def wait_for_story(bus: Bus, settings: Settings, task_id: str) -> dict[str, FluxEvent]:
    """The task's last events by kind once its story ended; ``OpenAIError`` if the wait ran out."""
    until = utcnow() + timedelta(seconds=settings.openai_wait_seconds)
    if not await bus.wait_for_any(task_id, STORY_END, until=until, recheck=2.0):
        raise OpenAIError(
            504,
            f"task {task_id} is still running after {settings.openai_wait_seconds:g}s; it goes on, "
            f"and its images will be in the history (GET /api/flux/task/{task_id})",
            "timeout",
            "task_pending",
        )
    story = {event.token: event for _, event in await bus.task_story(task_id)}
    if isinstance(failed := story.get("failed"), TaskFailed):
        raise OpenAIError(502, f"generation failed: {failed.data.error}", "server_error", "generation_failed")
    if isinstance(story.get("cancelled"), TaskCancelled):
        raise OpenAIError(409, f"task {task_id} was cancelled", "invalid_request_error", "cancelled")
    return story


async def image_entries(
    story: dict[str, FluxEvent], response_format: str, storage: Storage, http: httpx.AsyncClient
) -> list[dict[str, Any]]:
    """OpenAI's ``data`` entries: our stored copies (URLs from ``storage.url``: pre-signed for a
    private bucket), else fal's URLs (the copy failed)."""
    stored = story.get("stored")
    completed = story.get("completed")
    assert isinstance(completed, TaskCompleted)
    sources: list[tuple[str, str | None]]
    if isinstance(stored, ImagesStored):
        sources = [(img.url, img.key) for img in stored.data.images]
    else:
        sources = [(img.url, None) for img in completed.data.images]
    if response_format == "url":
        return [{"url": storage.url(key) if key else url} for url, key in sources]
    entries = []
    for url, key in sources:
        data = await _stored_bytes(storage, key) if key is not None else None
        if data is None:
            answer = await http.get(url)
            answer.raise_for_status()
            data = answer.content
        entries.append({"b64_json": base64.b64encode(data).decode()})
    return entries


async def _stored_bytes(storage: Storage, key: str) -> bytes | None:
    try:
        return await storage.get(key)
    except (StorageError, OSError):
        return None


@router.get("/models")
async def list_models(user: CurrentUser) -> dict[str, Any]:
    """The eleven FLUX models, as OpenAI's model list."""
    return {
        "object": "list",
        "data": [
            {"id": m.id, "object": "model", "created": 0, "owned_by": "fal-ai"} for m in MODELS.values()
        ],
    }


@router.post("/images/generations")
async def generations(
    body: GenerationRequest, user: CurrentUser, bus: BusDep, settings: SettingsDep, storage: StorageDep
) -> dict[str, Any]:
    """Generate images and answer with them once the task has ended (OpenAI's images API)."""
    model = resolve_model(settings, body.model)
    spec = MODELS[model]
    if spec.needs_image:
        raise OpenAIError(
            400,
            f"model {model} edits images ({spec.mode.value}); use POST /v1/images/edits",
            "invalid_request_error",
            "invalid_value",
        )
    data = task_data(settings, model, body.prompt, body.n, body.size, body.model_extra or {})
    return await _run_and_answer(bus, settings, storage, user.user_id, data, body.response_format)


async def _run_and_answer(
    bus: Bus, settings: Settings, storage: Storage, user_id: str, data: TaskRequestedData, fmt: str
) -> dict[str, Any]:
    task_id = uuid.uuid4().hex
    await run_task(bus, settings, task_id, user_id, data)
    story = await wait_for_story(bus, settings, task_id)
    async with httpx.AsyncClient(timeout=60) as http:
        entries = await image_entries(story, fmt, storage, http)
    return {"created": int(time.time()), "data": entries}
