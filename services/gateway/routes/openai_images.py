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
from collections.abc import Callable, Coroutine, Mapping
from datetime import timedelta
from typing import Any, Literal

import httpx
from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.datastructures import UploadFile

from schemas.catalog import ASPECT_RATIOS, MODELS, ModelSpec, params_model
from schemas.events import (
    FluxEvent,
    ImagesStored,
    TaskCancelled,
    TaskCompleted,
    TaskFailed,
    TaskRequestedData,
    utcnow,
)
from services.common.auth import Principal
from services.common.bus import Bus
from services.common.settings import Settings
from services.common.storage import Storage, StorageError
from services.gateway.deps import BusDep, CurrentUser, EngineDep, SettingsDep
from services.gateway.routes.flux import accept_job
from services.gateway.routes.uploads import store_input_image

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


def aliases(settings: Settings) -> dict[str, str]:
    table = {name: settings.default_model for name in OPENAI_NAMES}
    table.update(settings.openai_model_aliases)
    return table


def resolve_model(settings: Settings, requested: str | None, default: str | None = None) -> str:
    name = (requested or "").strip()
    if name in MODELS:
        return name
    if default is not None and name in OPENAI_NAMES:
        return default
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


def job_data(
    spec: ModelSpec,
    *,
    prompt: str | None,
    n: int,
    size: str | None,
    extra: Mapping[str, Any],
    image_urls: tuple[str, ...] = (),
) -> TaskRequestedData:
    """The task for ``spec``, validated by the model's own parameter model (the same one
    ``/api/flux`` uses): extra parameters the model does not take are dropped, those it takes
    must be valid (``OpenAIError`` 400 naming them)."""
    params = params_model(spec)
    takes = params.model_fields
    fields: dict[str, Any] = {"num_images": n}
    if "prompt" in takes and prompt:
        fields["prompt"] = prompt
    if "image_urls" in takes:
        fields["image_urls"] = list(image_urls)
    elif "image_url" in takes:
        fields["image_url"] = image_urls[0] if image_urls else None
    ratio = nearest_aspect_ratio(size)
    if ratio is not None and "aspect_ratio" in takes:
        fields["aspect_ratio"] = ratio
    for ours, names in PASSTHROUGH.items():
        for name in names:
            if ours in takes and extra.get(name) is not None:
                fields[ours] = extra[name]
                break
    try:
        validated = params.model_validate(fields).model_dump()
    except ValidationError as exc:
        raise OpenAIError(400, _describe(exc), "invalid_request_error", "invalid_value") from exc
    validated.pop("image_url", None)
    validated.pop("image_urls", None)
    return TaskRequestedData(model=spec.id, task_type=spec.task_type, image_urls=image_urls, **validated)


# What an edit with these many images becomes, for a model that does not fit them as asked.
EDIT_OF = {
    "fal-ai/flux-1/dev": "fal-ai/flux-1/dev/image-to-image",
    "fal-ai/flux-1/schnell": "fal-ai/flux-1/schnell/redux",
    "fal-ai/flux-pro/kontext/text-to-image": "fal-ai/flux-pro/kontext",
    "fal-ai/flux-pro/kontext/max/text-to-image": "fal-ai/flux-pro/kontext/max",
}
MULTI_OF = {
    "fal-ai/flux-pro/kontext": "fal-ai/flux-pro/kontext/multi",
    "fal-ai/flux-pro/kontext/max": "fal-ai/flux-pro/kontext/max/multi",
}


def edit_model(requested: str, images: int) -> ModelSpec:
    """The image model an edit runs on: text-to-image models map to their editing sibling, and
    kontext becomes kontext multi for two or more images."""
    model = EDIT_OF.get(requested, requested)
    if images > 1:
        model = MULTI_OF.get(model, model)
    spec = MODELS[model]
    if not spec.min_images <= images <= spec.max_images:
        wants = (
            f"exactly {spec.min_images}"
            if spec.min_images == spec.max_images
            else f"{spec.min_images} to {spec.max_images}"
        )
        raise OpenAIError(
            400,
            f"model {model} takes {wants} image(s), got {images}",
            "invalid_request_error",
            "invalid_value",
        )
    return spec


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
    body: GenerationRequest,
    user: CurrentUser,
    bus: BusDep,
    engine: EngineDep,
    settings: SettingsDep,
    request: Request,
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
    data = job_data(spec, prompt=body.prompt, n=body.n, size=body.size, extra=body.model_extra or {})
    return await _run_and_answer(request, bus, engine, settings, user, data, body.response_format)


EDIT_FIELDS = {"model", "prompt", "n", "size", "response_format", "image", "image[]", "user"}


@router.post("/images/edits", openapi_extra={"requestBody": {"content": {"multipart/form-data": {}}}})
async def edits(
    request: Request, user: CurrentUser, bus: BusDep, engine: EngineDep, settings: SettingsDep
) -> dict[str, Any]:
    """Edit images (multipart: ``image[]`` or ``image``, ``prompt``, ``model``, ``n``, ``size``,
    ``response_format``): each image is checked and stored like an upload, then the model and
    the number of images pick image-to-image, redux, kontext or kontext multi."""
    try:
        form = await request.form(max_files=8, max_fields=64)
    except Exception as exc:  # starlette's MultiPartException and malformed bodies
        raise OpenAIError(
            400, f"the body is not a valid multipart form: {exc}", "invalid_request_error"
        ) from exc
    files = [f for f in [*form.getlist("image[]"), *form.getlist("image")] if isinstance(f, UploadFile)]
    if not files:
        raise OpenAIError(
            400, "image: send one or more images as image[] (or image)", "invalid_request_error"
        )
    text = {k: v for k, v in form.multi_items() if isinstance(v, str)}
    try:
        n = int(text.get("n") or 1)
    except ValueError:
        raise OpenAIError(400, f"n: {text['n']!r} is not a number", "invalid_request_error") from None
    if not 1 <= n <= 4:
        raise OpenAIError(400, "n: Input should be between 1 and 4", "invalid_request_error", "invalid_value")
    fmt = text.get("response_format") or "b64_json"
    if fmt not in ("b64_json", "url"):
        raise OpenAIError(400, "response_format: 'b64_json' or 'url'", "invalid_request_error")
    requested = resolve_model(settings, text.get("model"), default=settings.openai_edit_model)
    spec = edit_model(requested, len(files))
    urls = []
    for index, upload in enumerate(files):
        raw = await upload.read(settings.max_upload_bytes + 1)
        stored = await store_input_image(
            settings,
            user.user_id,
            raw,
            upload.filename,
            field=f"image[{index}]",
            storage=request.app.state.storage,
        )
        urls.append(stored.url)
    extra = {k: v for k, v in text.items() if k not in EDIT_FIELDS}
    data = job_data(
        spec, prompt=text.get("prompt"), n=n, size=text.get("size"), extra=extra, image_urls=tuple(urls)
    )
    return await _run_and_answer(request, bus, engine, settings, user, data, fmt)


async def _run_and_answer(
    request: Request,
    bus: Bus,
    engine: AsyncEngine,
    settings: Settings,
    user: Principal,
    data: TaskRequestedData,
    fmt: str,
) -> dict[str, Any]:
    """The task goes through ``accept_job`` like any other (idempotency, credits, limits), then
    the answer waits for its story to end."""
    accepted = await accept_job(request, data, user, bus, engine, settings, Response(), None)
    story = await wait_for_story(bus, settings, accepted.task_id)
    async with httpx.AsyncClient(timeout=60) as http:
        entries = await image_entries(story, fmt, request.app.state.storage, http)
    return {"created": int(time.time()), "data": entries}
