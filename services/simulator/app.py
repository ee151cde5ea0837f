"""A local server that speaks fal.ai's queue protocol: the default provider when offline.

The reference is shared/fal-protocol.md; section numbers below (§1…§7) point into it. The simulator
emulates fal independently of the rest of fluxpipe (its own model catalogue and input validation),
so the pipeline's client is tested against fal's wire protocol rather than against itself.

Invariants:
- A request's state is a pure function of the clock: IN_QUEUE until `submitted + queue_seconds`,
  IN_PROGRESS until `+ run_seconds`, then COMPLETED. Cancellation and a `X-Fal-Request-Timeout`
  only move its end earlier. No timer drives the state: the model's work (validation, downloads,
  drawing) starts the first time anyone observes the request running, and only webhook delivery
  waits in the background.
- Input is validated the way fal does it: submit accepts any JSON object for a known model, the
  request goes through the queue, and the *result* carries the 422 (status still says COMPLETED).
- Output images are deterministic: the same prompt, seed and input images give identical bytes.
- Everything lives in memory and is forgotten one hour after completion (fal's result retention).
- The API key is compared in constant time and never echoed or logged.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import io
import json
import logging
import math
import secrets
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from urllib.parse import unquote_to_bytes

import httpx
import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image
from pydantic import BaseModel, Field
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from services.simulator.images import CONTENT_TYPES, EXTENSIONS, OutputFormat, render_image

logger = logging.getLogger(__name__)

_NAMESPACES = ("workflows", "comfy")
_ERROR_DOCS = "https://docs.fal.ai/errors/#"
_RETENTION_SECONDS = 3600.0
_STREAM_TICK_SECONDS = 0.05
_MAX_DOWNLOAD_BYTES = 20 * 1024 * 1024
_MAX_INPUT_PIXELS = 2 * 1024 * 1024
_WEBHOOK_USER_ID = "simulator"
_WEBHOOK_ATTEMPTS = 3
_CONTENT_POLICY_MESSAGE = (
    "The content could not be processed because it contained material flagged by a content checker."
)

_IMAGE_SIZES: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}
_ASPECT_RATIOS: dict[str, float] = {
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
_KONTEXT_RESOLUTIONS: tuple[tuple[int, int], ...] = (
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

Phase = Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]


class SimulatorSettings(BaseModel):
    """How the simulator behaves. `public_url` is the absolute base URL clients reach it at: every
    URL it hands out (status/response/cancel URLs, image URLs) is built from it."""

    api_key: str = Field(repr=False)
    public_url: str
    queue_seconds: float = Field(default=0.5, ge=0)
    run_seconds: float = Field(default=1.0, ge=0)
    blocked_words: list[str] = Field(default_factory=lambda: ["forbidden"])
    stream_ping_seconds: float = Field(default=5.0, gt=0)


# ---------------------------------------------------------------------------------------------------
# Model catalogue and validation (§7), emulating the pydantic errors fal returns (§3).


@dataclass(frozen=True)
class _Field:
    name: str
    kind: Literal["str", "int", "float", "bool", "choice", "image_size", "image", "images"]
    required: bool = False
    default: Any = None
    ge: int | float | None = None
    le: int | float | None = None
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Model:
    fields: tuple[_Field, ...]
    sizing: Literal["image_size", "input", "aspect_ratio"]


def _steps(default: int, le: int, ge: int = 1) -> _Field:
    return _Field("num_inference_steps", "int", default=default, ge=ge, le=le)


_PROMPT = _Field("prompt", "str", required=True)
_IMAGE_URL = _Field("image_url", "image", required=True)
_IMAGE_URLS = _Field("image_urls", "images", required=True)
_IMAGE_SIZE = _Field("image_size", "image_size", default="landscape_4_3")
_GUIDANCE = _Field("guidance_scale", "float", default=3.5, ge=1, le=20)
_NUM_IMAGES = _Field("num_images", "int", default=1, ge=1, le=4)
_SEED = _Field("seed", "int")
_SYNC_MODE = _Field("sync_mode", "bool", default=False)
_SAFETY_CHECKER = _Field("enable_safety_checker", "bool", default=True)
_OUTPUT_FORMAT = _Field("output_format", "choice", default="jpeg", choices=("jpeg", "png"))
_ACCELERATION = _Field("acceleration", "choice", default="regular", choices=("none", "regular", "high"))
_STRENGTH = _Field("strength", "float", default=0.95, ge=0.01, le=1)
_SAFETY_TOLERANCE = _Field("safety_tolerance", "choice", default="2", choices=("1", "2", "3", "4", "5", "6"))
_ENHANCE_PROMPT = _Field("enhance_prompt", "bool", default=False)
_ASPECT_RATIO = _Field("aspect_ratio", "choice", choices=tuple(_ASPECT_RATIOS))
_ASPECT_RATIO_SQUARE = _Field("aspect_ratio", "choice", default="1:1", choices=tuple(_ASPECT_RATIOS))

_FLUX1_COMMON = (_NUM_IMAGES, _SEED, _SYNC_MODE, _SAFETY_CHECKER, _OUTPUT_FORMAT, _ACCELERATION)
_KONTEXT_COMMON = (
    _SEED,
    _GUIDANCE,
    _SYNC_MODE,
    _NUM_IMAGES,
    _OUTPUT_FORMAT,
    _SAFETY_TOLERANCE,
    _ENHANCE_PROMPT,
)
_KONTEXT_EDIT = _Model((_PROMPT, _IMAGE_URL, *_KONTEXT_COMMON, _ASPECT_RATIO), "aspect_ratio")
_KONTEXT_MULTI = _Model((_PROMPT, _IMAGE_URLS, *_KONTEXT_COMMON, _ASPECT_RATIO), "aspect_ratio")
_KONTEXT_T2I = _Model((_PROMPT, *_KONTEXT_COMMON, _ASPECT_RATIO_SQUARE), "aspect_ratio")

_MODELS: dict[str, _Model] = {
    "fal-ai/flux-1/dev": _Model(
        (_PROMPT, _IMAGE_SIZE, _steps(28, 50), _GUIDANCE, *_FLUX1_COMMON), "image_size"
    ),
    "fal-ai/flux-1/dev/image-to-image": _Model(
        (_PROMPT, _IMAGE_URL, _STRENGTH, _steps(40, 50, ge=10), _GUIDANCE, *_FLUX1_COMMON), "input"
    ),
    "fal-ai/flux-1/dev/redux": _Model(
        (_IMAGE_URL, _IMAGE_SIZE, _steps(28, 50), _GUIDANCE, *_FLUX1_COMMON), "image_size"
    ),
    "fal-ai/flux-1/schnell": _Model(
        (_PROMPT, _IMAGE_SIZE, _steps(4, 12), _GUIDANCE, *_FLUX1_COMMON), "image_size"
    ),
    "fal-ai/flux-1/schnell/redux": _Model(
        (_IMAGE_URL, _IMAGE_SIZE, _steps(4, 12), *_FLUX1_COMMON), "image_size"
    ),
    "fal-ai/flux-pro/kontext": _KONTEXT_EDIT,
    "fal-ai/flux-pro/kontext/max": _KONTEXT_EDIT,
    "fal-ai/flux-pro/kontext/multi": _KONTEXT_MULTI,
    "fal-ai/flux-pro/kontext/max/multi": _KONTEXT_MULTI,
    "fal-ai/flux-pro/kontext/text-to-image": _KONTEXT_T2I,
    "fal-ai/flux-pro/kontext/max/text-to-image": _KONTEXT_T2I,
}

_ABSENT: Any = object()
Loc = tuple[str | int, ...]


def _error(loc: Loc, msg: str, type_: str, value: Any = _ABSENT, ctx: dict[str, Any] | None = None) -> dict:
    """One entry of fal's `detail` list: `loc, msg, type, url` always, `ctx, input` when known."""
    entry: dict[str, Any] = {"loc": ["body", *loc], "msg": msg, "type": type_, "url": _ERROR_DOCS + type_}
    if ctx is not None:
        entry["ctx"] = ctx
    if value is not _ABSENT:
        entry["input"] = value
    return entry


def _describe_choices(choices: tuple[str, ...]) -> str:
    quoted = [f"'{c}'" for c in choices]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + f" or {quoted[-1]}"


def _as_int(value: Any, loc: Loc) -> tuple[Any, list[dict]]:
    if isinstance(value, bool):
        return None, [_error(loc, "Input should be a valid integer", "int_type", value)]
    if isinstance(value, int):
        return value, []
    if isinstance(value, float):
        if value.is_integer():
            return int(value), []
        msg = "Input should be a valid integer, got a number with a fractional part"
        return None, [_error(loc, msg, "int_from_float", value)]
    if isinstance(value, str):
        try:
            return int(value.strip()), []
        except ValueError:
            msg = "Input should be a valid integer, unable to parse string as an integer"
            return None, [_error(loc, msg, "int_parsing", value)]
    return None, [_error(loc, "Input should be a valid integer", "int_type", value)]


def _as_float(value: Any, loc: Loc) -> tuple[Any, list[dict]]:
    if isinstance(value, bool):
        return None, [_error(loc, "Input should be a valid number", "float_type", value)]
    if isinstance(value, int | float):
        return float(value), []
    if isinstance(value, str):
        try:
            return float(value.strip()), []
        except ValueError:
            msg = "Input should be a valid number, unable to parse string as a number"
            return None, [_error(loc, msg, "float_parsing", value)]
    return None, [_error(loc, "Input should be a valid number", "float_type", value)]


def _check_range(spec: _Field, value: int | float, loc: Loc) -> list[dict]:
    if spec.ge is not None and value < spec.ge:
        msg = f"Input should be greater than or equal to {spec.ge}"
        return [_error(loc, msg, "greater_than_equal", value, {"ge": spec.ge})]
    if spec.le is not None and value > spec.le:
        msg = f"Input should be less than or equal to {spec.le}"
        return [_error(loc, msg, "less_than_equal", value, {"le": spec.le})]
    return []


_CUSTOM_SIDES = (
    _Field("width", "int", default=512, ge=16, le=4096),
    _Field("height", "int", default=512, ge=16, le=4096),
)


def _check_image_size(value: Any, loc: Loc) -> tuple[Any, list[dict]]:
    if isinstance(value, str):
        if value in _IMAGE_SIZES:
            return value, []
        choices = tuple(_IMAGE_SIZES)
        msg = f"Input should be {_describe_choices(choices)}"
        return None, [_error(loc, msg, "one_of", value, {"expected": list(choices)})]
    if not isinstance(value, dict):
        msg = "Input should be a valid dictionary or instance of ImageSize"
        return None, [_error(loc, msg, "model_type", value)]
    # ⚠ fal does not document bounds for a custom size; the simulator caps each side at 4096 px so
    # that a request cannot make it allocate an unbounded canvas.
    dims: dict[str, int] = {}
    errors: list[dict] = []
    for side in _CUSTOM_SIDES:
        parsed, errs = _as_int(value.get(side.name, side.default), (*loc, side.name))
        errors += errs or _check_range(side, parsed, (*loc, side.name))
        dims[side.name] = parsed
    return (dims if not errors else None), errors


def _check_field(spec: _Field, value: Any) -> tuple[Any, list[dict]]:
    """Validate and normalise one present field value (None is a type error, as in pydantic)."""
    loc: Loc = (spec.name,)
    if spec.kind in ("str", "image"):
        if isinstance(value, str):
            return value, []
        return None, [_error(loc, "Input should be a valid string", "string_type", value)]
    if spec.kind == "bool":
        if isinstance(value, bool):
            return value, []
        return None, [_error(loc, "Input should be a valid boolean", "bool_type", value)]
    if spec.kind in ("int", "float"):
        parsed, errors = (_as_int if spec.kind == "int" else _as_float)(value, loc)
        return parsed, errors or _check_range(spec, parsed, loc)
    if spec.kind == "choice":
        if isinstance(value, str) and value in spec.choices:
            return value, []
        msg = f"Input should be {_describe_choices(spec.choices)}"
        return None, [_error(loc, msg, "one_of", value, {"expected": list(spec.choices)})]
    if spec.kind == "image_size":
        return _check_image_size(value, loc)
    if not isinstance(value, list):
        return None, [_error(loc, "Input should be a valid list", "list_type", value)]
    if not value:
        # ⚠ the minimum length of image_urls is undocumented; an empty list is refused.
        msg = "Sequence should have at least 1 items"
        return None, [_error(loc, msg, "sequence_too_short", value, {"min_length": 1})]
    errors = [
        _error((*loc, i), "Input should be a valid string", "string_type", item)
        for i, item in enumerate(value)
        if not isinstance(item, str)
    ]
    return (list(value) if not errors else None), errors


def _validate(model: _Model, arguments: dict[str, Any]) -> tuple[dict[str, Any], list[dict]]:
    """Normalised arguments with defaults filled in, and every validation error (empty if valid).

    Unknown keys are ignored, as pydantic models do by default."""
    values: dict[str, Any] = {}
    errors: list[dict] = []
    for spec in model.fields:
        raw = arguments.get(spec.name, _ABSENT)
        if raw is _ABSENT or (raw is None and not spec.required and spec.default is None):
            if spec.required:
                errors.append(_error((spec.name,), "Field required", "missing", arguments))
            values[spec.name] = spec.default
            continue
        parsed, field_errors = _check_field(spec, raw)
        errors += field_errors
        values[spec.name] = parsed
    return values, errors


# ---------------------------------------------------------------------------------------------------
# Output sizes.


def _kontext_size(ratio: float) -> tuple[int, int]:
    return min(_KONTEXT_RESOLUTIONS, key=lambda wh: abs(math.log(wh[0] / wh[1]) - math.log(ratio)))


def _input_size(width: int, height: int) -> tuple[int, int]:
    """⚠ Image-to-image keeps the input's size, scaled down to at most 2 MP and to multiples of 16."""
    scale = min(1.0, math.sqrt(_MAX_INPUT_PIXELS / (width * height)))
    return max(16, int(width * scale) // 16 * 16), max(16, int(height * scale) // 16 * 16)


def _output_size(model: _Model, values: dict[str, Any], inputs: list[Image.Image]) -> tuple[int, int]:
    if model.sizing == "input":
        return _input_size(*inputs[0].size)
    if model.sizing == "aspect_ratio":
        if values.get("aspect_ratio"):
            return _kontext_size(_ASPECT_RATIOS[values["aspect_ratio"]])
        # ⚠ without aspect_ratio a kontext edit follows its (first) input image's shape.
        width, height = inputs[0].size
        return _kontext_size(width / height)
    size = values["image_size"]
    if isinstance(size, dict):
        return size["width"], size["height"]
    return _IMAGE_SIZES[size]


# ---------------------------------------------------------------------------------------------------
# Requests.


@dataclass(frozen=True)
class _Outcome:
    """What the result endpoint answers (and what a webhook carries) once a request is COMPLETED."""

    status_code: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    error_type: str | None = None


class _InputFailure(Exception):
    def __init__(self, entry: dict) -> None:
        super().__init__(entry["msg"])
        self.entry = entry


@dataclass(eq=False)
class _Request:
    request_id: str
    model_id: str
    app_path: str
    arguments: dict[str, Any]
    base_url: str
    submitted_at: float
    submitted_wall: float
    started_at: float
    done_at: float
    webhook_url: str | None
    termination: Literal["cancelled", "timeout"] | None = None
    model_run: asyncio.Task[_Outcome] | None = None
    files: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def response_url(self) -> str:
        return f"{self.base_url}/{self.app_path}/requests/{self.request_id}"

    def urls(self) -> dict[str, str]:
        return {
            "response_url": self.response_url,
            "status_url": self.response_url + "/status",
            "cancel_url": self.response_url + "/cancel",
        }

    def phase(self, now: float) -> Phase:
        if now >= self.done_at:
            return "COMPLETED"
        if now >= self.started_at:
            return "IN_PROGRESS"
        return "IN_QUEUE"

    def ran(self) -> bool:
        return self.started_at < self.done_at

    def wall(self, moment: float) -> str:
        return datetime.fromtimestamp(self.submitted_wall + moment - self.submitted_at, UTC).isoformat()


def _cancelled_outcome() -> _Outcome:
    # ⚠ fal documents neither the status nor the result of a cancelled request. The simulator ends it
    # at once: status COMPLETED with `error`/`error_type` (the shape fal uses for runner failures,
    # and the only one fal's clients accept, since they know just three statuses), and a 400 result.
    message = "Request was cancelled"
    body = {"detail": message, "error_type": "request_cancelled"}
    headers = {"X-Fal-Error-Type": "request_cancelled"}
    return _Outcome(400, body, headers, error=message, error_type="request_cancelled")


def _timeout_outcome() -> _Outcome:
    message = "Request timed out"
    body = {"detail": message, "error_type": "request_timeout"}
    headers = {"X-Fal-Error-Type": "request_timeout", "X-Fal-Request-Timeout-Type": "user"}
    return _Outcome(504, body, headers, error=message, error_type="request_timeout")


def _unprocessable(entries: list[dict]) -> _Outcome:
    return _Outcome(422, {"detail": entries}, {"X-Fal-Retryable": "false"})


def _split_endpoint(endpoint: str) -> tuple[str, str] | None:
    """(`[namespace/]owner/alias`, full id) for a model id, or None if it is not one (§1)."""
    parts = endpoint.strip("/").split("/")
    if any(not part for part in parts):
        return None
    head = parts[:1] if parts[0] in _NAMESPACES else []
    rest = parts[len(head) :]
    if len(rest) < 2:
        return None
    return "/".join(head + rest[:2]), "/".join(parts)


def _decode_data_uri(uri: str) -> bytes:
    header, sep, payload = uri[5:].partition(",")
    if not sep:
        raise ValueError("data URI without payload")
    if header.endswith(";base64"):
        return base64.b64decode(payload, validate=True)
    return unquote_to_bytes(payload)


def _load_image(data: bytes, loc: Loc, source: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            return opened.convert("RGB")
    except Exception as exc:
        raise _InputFailure(_error(loc, "Image load error", "image_load_error", source)) from exc


class _Simulator:
    """The in-memory queue behind the routes. All methods run on the server's event loop."""

    def __init__(self, settings: SimulatorSettings) -> None:
        self.settings = settings
        self.base_url = settings.public_url.rstrip("/")
        self.requests: dict[str, _Request] = {}
        self._queues: dict[str, deque[_Request]] = {}
        self._http: httpx.AsyncClient | None = None
        self._webhooks: set[asyncio.Task[None]] = set()
        self.signing_key = Ed25519PrivateKey.generate()

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(follow_redirects=True, timeout=httpx.Timeout(10.0))
        return self._http

    async def close(self) -> None:
        for task in list(self._webhooks):
            task.cancel()
        await asyncio.gather(*self._webhooks, return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()

    def jwks(self) -> dict[str, Any]:
        raw = self.signing_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        x = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
        return {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "simulator", "use": "sig"}]}

    # -- queue ------------------------------------------------------------------------------------

    def _expire(self, now: float) -> None:
        horizon = self.settings.queue_seconds + self.settings.run_seconds + _RETENTION_SECONDS
        while self.requests:
            oldest = next(iter(self.requests.values()))
            if oldest.submitted_at + horizon >= now:
                break
            del self.requests[oldest.request_id]

    def submit(
        self,
        app_path: str,
        model_id: str,
        arguments: dict[str, Any],
        webhook_url: str | None,
        start_timeout: float | None,
    ) -> _Request:
        now = time.monotonic()
        self._expire(now)
        started_at = now + self.settings.queue_seconds
        done_at = started_at + self.settings.run_seconds
        termination: Literal["timeout"] | None = None
        if start_timeout is not None and start_timeout < self.settings.queue_seconds:
            started_at, done_at, termination = math.inf, now + start_timeout, "timeout"
        req = _Request(
            request_id=str(uuid.uuid4()),
            model_id=model_id,
            app_path=app_path,
            arguments=arguments,
            base_url=self.base_url,
            submitted_at=now,
            submitted_wall=time.time(),
            started_at=started_at,
            done_at=done_at,
            webhook_url=webhook_url,
            termination=termination,
        )
        self.requests[req.request_id] = req
        queue = self._queues.setdefault(app_path, deque())
        self._prune(queue, now)
        queue.append(req)
        if webhook_url is not None:
            task = asyncio.get_running_loop().create_task(self._deliver_webhook(req))
            self._webhooks.add(task)
            task.add_done_callback(self._webhooks.discard)
        return req

    def lookup(self, app_path: str, request_id: str) -> _Request | None:
        """The request, only if addressed through its own `[namespace/]owner/alias` (§1 URL rule)."""
        req = self.requests.get(request_id)
        return req if req is not None and req.app_path == app_path else None

    @staticmethod
    def _prune(queue: deque[_Request], now: float) -> None:
        while queue and queue[0].phase(now) != "IN_QUEUE":
            queue.popleft()

    def queue_position(self, req: _Request, now: float) -> int:
        """0-indexed position among the app's requests still IN_QUEUE, in submission order."""
        queue = self._queues.get(req.app_path, deque())
        self._prune(queue, now)
        position = 0
        for other in queue:
            if other is req:
                break
            if other.phase(now) == "IN_QUEUE":
                position += 1
        return position

    def cancel(self, req: _Request) -> bool:
        """End a request that is not COMPLETED yet; False if it already was."""
        now = time.monotonic()
        if req.phase(now) == "COMPLETED":
            return False
        req.done_at, req.termination = now, "cancelled"
        req.ended.set()
        return True

    # -- status -----------------------------------------------------------------------------------

    def logs(self, req: _Request, now: float) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = []

        def add(moment: float, message: str) -> None:
            entries.append(
                {"message": message, "level": "INFO", "source": "user", "timestamp": req.wall(moment)}
            )

        if req.ran() and now >= req.started_at:
            add(req.started_at, f"Running {req.model_id}")
        if req.phase(now) == "COMPLETED":
            if req.termination == "cancelled":
                add(req.done_at, "Request cancelled")
            elif req.termination is None:
                add(req.done_at, f"Finished in {self.settings.run_seconds:.2f}s")
        return entries

    def status_body(self, req: _Request, now: float, logs: list[dict[str, Any]] | None) -> dict[str, Any]:
        """The status JSON of §2 for `req` at `now`; `logs` is None when logs were not asked for."""
        phase = req.phase(now)
        body: dict[str, Any] = {"status": phase, "request_id": req.request_id, **req.urls()}
        if phase == "IN_QUEUE":
            body["queue_position"] = self.queue_position(req, now)
            return body
        body["logs"] = logs
        body["metrics"] = {}
        if phase == "COMPLETED":
            if req.termination is None:
                body["metrics"] = {"inference_time": self.settings.run_seconds}
            else:
                outcome = _cancelled_outcome() if req.termination == "cancelled" else _timeout_outcome()
                body["error"], body["error_type"] = outcome.error, outcome.error_type
        return body

    def observe(self, req: _Request, now: float) -> Phase:
        """The phase at `now`; once a request has started, its model run is started too."""
        phase = req.phase(now)
        if phase != "IN_QUEUE" and req.termination is None and req.model_run is None:
            req.model_run = asyncio.get_running_loop().create_task(self._run_model(req))
        return phase

    async def stream(self, req: _Request, with_logs: bool) -> AsyncIterator[str]:
        """SSE events: one `data:` per change of status, position or logs; `: ping` while idle;
        the stream ends right after the COMPLETED event. Logs are sent incrementally (⚠ §2)."""
        last_key: tuple[Any, ...] | None = None
        sent_logs = 0
        last_write = time.monotonic()
        while True:
            now = time.monotonic()
            phase = self.observe(req, now)
            logs = self.logs(req, now) if with_logs else []
            position = self.queue_position(req, now) if phase == "IN_QUEUE" else None
            key = (phase, position, len(logs))
            if key != last_key:
                body = self.status_body(req, now, logs[sent_logs:] if with_logs else None)
                yield f"data: {json.dumps(body)}\n\n"
                last_key, sent_logs, last_write = key, len(logs), now
                if phase == "COMPLETED":
                    return
            elif now - last_write >= self.settings.stream_ping_seconds:
                yield ": ping\n\n"
                last_write = now
            await asyncio.sleep(_STREAM_TICK_SECONDS)

    # -- results ----------------------------------------------------------------------------------

    async def outcome(self, req: _Request) -> _Outcome:
        """The result of a COMPLETED request. A termination (cancel, timeout) wins over a model run
        that was already under way."""
        if req.termination == "cancelled":
            return _cancelled_outcome()
        if req.termination == "timeout":
            return _timeout_outcome()
        self.observe(req, time.monotonic())
        assert req.model_run is not None
        result = await asyncio.shield(req.model_run)
        return _cancelled_outcome() if req.termination == "cancelled" else result

    async def _run_model(self, req: _Request) -> _Outcome:
        try:
            return await self._generate(req)
        except Exception:
            logger.exception("simulated model run failed for request %s", req.request_id)
            entry = _error((), "Internal server error", "internal_server_error", req.arguments)
            return _Outcome(500, {"detail": [entry]}, {"X-Fal-Retryable": "true"})

    async def _generate(self, req: _Request) -> _Outcome:
        model = _MODELS[req.model_id]
        values, errors = _validate(model, req.arguments)
        if errors:
            return _unprocessable(errors)
        prompt: str = values.get("prompt") or ""
        lowered = prompt.lower()
        if any(word.lower() in lowered for word in self.settings.blocked_words if word):
            entry = _error(("prompt",), _CONTENT_POLICY_MESSAGE, "content_policy_violation", prompt)
            return _unprocessable([entry])

        sources: list[tuple[Loc, str]] = []
        if "image_url" in values:
            sources.append((("image_url",), values["image_url"]))
        for i, url in enumerate(values.get("image_urls") or []):
            sources.append((("image_urls", i), url))
        try:
            downloads = [(loc, url, await self._download(url, loc)) for loc, url in sources]
        except _InputFailure as failure:
            return _unprocessable([failure.entry])

        seed = values["seed"] if values["seed"] is not None else secrets.randbelow(2**32)
        output_format: OutputFormat = values["output_format"]

        def render() -> tuple[int, int, list[bytes]]:
            inputs = [_load_image(data, loc, url) for loc, url, data in downloads]
            width, height = _output_size(model, values, inputs)
            base = inputs[0] if inputs else None
            images = [
                render_image(
                    prompt=prompt,
                    seed=seed,
                    index=i,
                    width=width,
                    height=height,
                    output_format=output_format,
                    base=base,
                )
                for i in range(values["num_images"])
            ]
            return width, height, images

        try:
            width, height, images = await asyncio.to_thread(render)
        except _InputFailure as failure:
            return _unprocessable([failure.entry])

        content_type = CONTENT_TYPES[output_format]
        entries = []
        for i, data in enumerate(images):
            if values["sync_mode"]:
                url = f"data:{content_type};base64,{base64.b64encode(data).decode()}"
            else:
                name = f"{i}.{EXTENSIONS[output_format]}"
                req.files[name] = (data, content_type)
                url = f"{self.base_url}/files/{req.request_id}/{name}"
            entries.append({"url": url, "width": width, "height": height, "content_type": content_type})
        body = {
            "images": entries,
            "timings": {"inference": self.settings.run_seconds},
            "seed": seed,
            "has_nsfw_concepts": [False] * len(entries),
            "prompt": prompt,
        }
        return _Outcome(200, body)

    async def _download(self, url: str, loc: Loc) -> bytes:
        """The bytes behind an image URL or data URI; `_InputFailure` (file_download_error,
        image_load_error for an undecodable data URI) when they cannot be had."""
        if url.startswith("data:"):
            try:
                return _decode_data_uri(url)
            except (ValueError, binascii.Error) as exc:
                raise _InputFailure(_error(loc, "Image load error", "image_load_error", url[:64])) from exc
        failure = _InputFailure(_error(loc, "File download error", "file_download_error", url))
        if not url.startswith(("http://", "https://")):
            raise failure
        try:
            async with self.http.stream("GET", url) as response:
                if response.status_code != 200:
                    raise failure
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > _MAX_DOWNLOAD_BYTES:
                        raise failure
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.HTTPError as exc:
            raise failure from exc

    # -- webhooks ---------------------------------------------------------------------------------

    async def _deliver_webhook(self, req: _Request) -> None:
        """POST the §5 body to the request's `fal_webhook` once it is COMPLETED, signed as §5 says
        (Ed25519 key published at /.well-known/jwks.json). ⚠ fal retries 10 times over 2 h; the
        simulator tries `_WEBHOOK_ATTEMPTS` times with a short backoff."""
        assert req.webhook_url is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(req.ended.wait(), timeout=max(0.0, req.done_at - time.monotonic()))
        outcome = await self.outcome(req)
        body: dict[str, Any] = {"request_id": req.request_id, "gateway_request_id": req.request_id}
        if 200 <= outcome.status_code < 300:
            body |= {"status": "OK", "payload": outcome.body}
        else:
            body |= {
                "status": "ERROR",
                "error": f"Invalid status code: {outcome.status_code}",
                "payload": outcome.body,
            }
        raw = json.dumps(body).encode()
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(_WEBHOOK_ATTEMPTS),
                wait=wait_exponential(multiplier=0.5, max=5),
                retry=retry_if_exception_type(httpx.HTTPError),
                reraise=True,
            ):
                with attempt:
                    response = await self.http.post(
                        req.webhook_url, content=raw, headers=self._sign(req, raw)
                    )
                    response.raise_for_status()
        except httpx.HTTPError as exc:
            logger.warning("webhook for request %s not delivered: %s", req.request_id, type(exc).__name__)

    def _sign(self, req: _Request, raw: bytes) -> dict[str, str]:
        timestamp = str(int(time.time()))
        message = "\n".join([req.request_id, _WEBHOOK_USER_ID, timestamp, hashlib.sha256(raw).hexdigest()])
        return {
            "Content-Type": "application/json",
            "X-Fal-Webhook-Request-Id": req.request_id,
            "X-Fal-Webhook-User-Id": _WEBHOOK_USER_ID,
            "X-Fal-Webhook-Timestamp": timestamp,
            "X-Fal-Webhook-Signature": self.signing_key.sign(message.encode()).hex(),
        }


# ---------------------------------------------------------------------------------------------------
# HTTP.


def _not_found(detail: str = "Request not found") -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=404)


def _truthy(flag: str | None) -> bool:
    return (flag or "").strip().lower() in ("1", "true", "yes")


def _key_checker(api_key: str) -> Callable[[Request], None]:
    expected = f"Key {api_key}".encode()

    def require_key(request: Request) -> None:
        supplied = request.headers.get("authorization")
        if supplied is None:
            raise _Unauthorized("Missing Authorization header")
        if not hmac.compare_digest(supplied.encode(), expected):
            raise _Unauthorized("Invalid API key")

    return require_key


class _Unauthorized(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def create_app(settings: SimulatorSettings) -> FastAPI:
    """The simulator as an ASGI app. Routes follow §1: submit with the full model id; status,
    result and cancel only under `[namespace/]owner/alias` (anything else is a 404)."""
    sim = _Simulator(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await sim.close()

    app = FastAPI(title="fal queue simulator", lifespan=lifespan)
    app.state.simulator = sim
    queue = APIRouter(dependencies=[Depends(_key_checker(settings.api_key))])

    @app.exception_handler(_Unauthorized)
    async def unauthorized(_: Request, exc: _Unauthorized) -> JSONResponse:
        # ⚠ fal's 401 body is undocumented; FastAPI's `{"detail": …}` shape is used.
        return JSONResponse({"detail": exc.detail}, status_code=401)

    @app.get("/files/{request_id}/{name}")
    async def get_file(request_id: str, name: str) -> Response:
        """Download a generated image (public, like fal.media)."""
        req = sim.requests.get(request_id)
        stored = req.files.get(name) if req is not None else None
        if stored is None:
            return _not_found("File not found")
        return Response(stored[0], media_type=stored[1])

    @app.get("/.well-known/jwks.json")
    async def get_jwks() -> dict[str, Any]:
        """Public keys that verify the simulator's webhook signatures."""
        return sim.jwks()

    @queue.get("/{app_path:path}/requests/{request_id}/status/stream", response_model=None)
    async def stream_status(
        app_path: str, request_id: str, logs: Annotated[str | None, Query()] = None
    ) -> Response:
        """Follow a request's status as server-sent events until it is COMPLETED."""
        req = sim.lookup(app_path, request_id)
        if req is None:
            return _not_found()
        headers = {"Cache-Control": "no-cache", "x-fal-request-id": req.request_id}
        return StreamingResponse(
            sim.stream(req, _truthy(logs)), media_type="text/event-stream", headers=headers
        )

    @queue.get("/{app_path:path}/requests/{request_id}/status")
    async def get_status(
        app_path: str, request_id: str, logs: Annotated[str | None, Query()] = None
    ) -> JSONResponse:
        """Report a request's status: 202 while queued or running, 200 once COMPLETED."""
        req = sim.lookup(app_path, request_id)
        if req is None:
            return _not_found()
        now = time.monotonic()
        phase = sim.observe(req, now)
        body = sim.status_body(req, now, sim.logs(req, now) if _truthy(logs) else None)
        code = 200 if phase == "COMPLETED" else 202
        return JSONResponse(body, status_code=code, headers={"x-fal-request-id": req.request_id})

    @queue.get("/{app_path:path}/requests/{request_id}")
    async def get_result(app_path: str, request_id: str) -> JSONResponse:
        """Return a COMPLETED request's result: the model's output or its error, as fal relays it."""
        req = sim.lookup(app_path, request_id)
        if req is None:
            return _not_found()
        if sim.observe(req, time.monotonic()) != "COMPLETED":
            return JSONResponse({"detail": "Request is still in progress"}, status_code=400)
        outcome = await sim.outcome(req)
        headers = {**outcome.headers, "x-fal-request-id": req.request_id}
        return JSONResponse(outcome.body, status_code=outcome.status_code, headers=headers)

    @queue.put("/{app_path:path}/requests/{request_id}/cancel")
    async def cancel_request(app_path: str, request_id: str) -> JSONResponse:
        """Cancel a queued or running request (202), or report it ALREADY_COMPLETED (400)."""
        req = sim.lookup(app_path, request_id)
        if req is None:
            # ⚠ the HTTP code of NOT_FOUND is undocumented; 404 with both fal body shapes.
            return JSONResponse({"status": "NOT_FOUND", "detail": "Request not found"}, status_code=404)
        if sim.cancel(req):
            return JSONResponse({"status": "CANCELLATION_REQUESTED"}, status_code=202)
        return JSONResponse({"status": "ALREADY_COMPLETED"}, status_code=400)

    @queue.post("/{endpoint:path}")
    async def submit(
        endpoint: str,
        request: Request,
        fal_webhook: Annotated[str | None, Query()] = None,
    ) -> JSONResponse:
        """Queue a request for a model; the answer carries the URLs to follow it (§1)."""
        parsed = _split_endpoint(endpoint)
        if parsed is None or parsed[1] not in _MODELS:
            # ⚠ fal's answer for an unknown application is undocumented.
            return _not_found(f"Application '{endpoint.strip('/')}' not found")
        app_path, model_id = parsed
        try:
            arguments = json.loads(await request.body() or b"null")
        except ValueError:
            arguments = _ABSENT
        if not isinstance(arguments, dict):
            # ⚠ a body that is not a JSON object is refused at submit rather than queued.
            msg = "Input should be a valid dictionary or object to extract fields from"
            entry = _error((), msg, "model_attributes_type")
            return JSONResponse({"detail": [entry]}, status_code=422)
        start_timeout: float | None = None
        try:
            start_timeout = float(request.headers["x-fal-request-timeout"])
        except (KeyError, ValueError):
            pass
        req = sim.submit(app_path, model_id, arguments, fal_webhook or None, start_timeout)
        body: dict[str, Any] = {
            "status": "IN_QUEUE",
            "request_id": req.request_id,
            **req.urls(),
            "logs": None,
            "metrics": {},
            "queue_position": sim.queue_position(req, time.monotonic()),
        }
        if fal_webhook:
            body["gateway_request_id"] = req.request_id
        return JSONResponse(body, headers={"x-fal-request-id": req.request_id})

    app.include_router(queue)
    return app


def main(host: str, port: int, settings: SimulatorSettings) -> None:
    """Serve the simulator until interrupted."""
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning")
