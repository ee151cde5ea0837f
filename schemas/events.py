"""The event log's contract: one envelope, one frozen pydantic model per event, versioned.

Every event is a ``FluxEvent``: the envelope fields plus a ``type`` literal and a typed
``data`` payload. ``decode_event`` reads any of them from JSON through one discriminated
union; an unknown ``type`` or ``version`` raises ``UnknownEvent`` so consumers can
dead-letter it instead of crash-looping.

Subjects carry the task: ``<prefix>.task.<task_id>.<token>``, so a task's whole story is the
filter ``<prefix>.task.<task_id>.>``. ``msg_id`` is deterministic (task, event and, for
repeatable events, a sequence number; ``end`` for every terminal event) and is sent as
``Nats-Msg-Id`` so a publish retried after a crash is dropped by the server's
de-duplication window.

Events about no single task live on their own subjects: ``<prefix>.config.changed`` (the
whole configuration after each change) and the per-user ledger ``<prefix>.credits.<user>``
(every credit movement, each carrying the balance after it; see services/common/credits.py).
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal, Self
from uuid import UUID, uuid4

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

TaskStatus = Literal["PENDING", "IN_QUEUE", "IN_PROGRESS", "SUCCESS", "FAILED", "CANCELLED"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"SUCCESS", "FAILED", "CANCELLED"})


def utcnow() -> datetime:
    return datetime.now(UTC)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FluxEvent(_Frozen):
    """The envelope every event shares."""

    token: ClassVar[str]
    terminal: ClassVar[bool] = False

    event_id: UUID = Field(default_factory=uuid4)
    version: int = 1
    task_id: str
    user_id: str
    occurred_at: datetime = Field(default_factory=utcnow)
    causation_id: UUID | None = None

    @classmethod
    def caused_by(cls, cause: FluxEvent, data: Any) -> Self:
        """This event, for the task and user of ``cause``, recording ``cause`` as its cause."""
        fields: dict[str, Any] = {
            "task_id": cause.task_id,
            "user_id": cause.user_id,
            "causation_id": cause.event_id,
            "data": data,  # each event type declares its own
        }
        return cls(**fields)

    def subject(self, prefix: str) -> str:
        return f"{prefix}.task.{self.task_id}.{self.token}"

    @property
    def msg_id(self) -> str:
        """Terminal events share one id, ``<task>.end``: whichever ends the task first is the
        only one the server keeps (within the duplicate window), so a task ends exactly once."""
        return f"{self.task_id}.{'end' if self.terminal else self.token}"


# --- payloads ---------------------------------------------------------------------------


class TaskRequestedData(_Frozen):
    model: str
    task_type: Literal["text_to_image", "image_to_image"]
    prompt: str | None = None
    image_urls: tuple[str, ...] = ()
    num_images: int = 1
    aspect_ratio: str | None = None
    guidance_scale: float | None = None
    num_inference_steps: int | None = None
    seed: int | None = None
    safety_tolerance: str | None = None
    strength: float | None = None
    output_format: Literal["jpeg", "png"] = "jpeg"
    retry_of: str | None = Field(None, description="the task this one retries (POST .../retry)")


class TaskSubmittedData(_Frozen):
    request_id: str
    status_url: str
    response_url: str
    cancel_url: str
    queue_position: int | None = None


class TaskStatusChangedData(_Frozen):
    status: Literal["IN_QUEUE", "IN_PROGRESS"]
    queue_position: int | None = None
    seq: int = Field(ge=1, description="n-th status change of this task; part of the msg id")


class ProviderImage(_Frozen):
    url: str
    width: int | None = None
    height: int | None = None
    content_type: str | None = None


class TaskCompletedData(_Frozen):
    request_id: str
    images: tuple[ProviderImage, ...]
    seed: int | None = None
    generation_time: float | None = None
    has_nsfw_concepts: tuple[bool, ...] = ()


FailureStage = Literal["submit", "poll", "result", "timeout", "storage"]


class TaskFailedData(_Frozen):
    stage: FailureStage
    error: str
    error_type: str | None = None
    status_code: int | None = None
    request_id: str | None = None


class StoredImage(_Frozen):
    url: str
    key: str
    content_type: str
    width: int
    height: int
    size: int


class ImagesStoredData(_Frozen):
    images: tuple[StoredImage, ...] = Field(min_length=1)


class StorageFailedData(_Frozen):
    error: str


class TaskCancelledData(_Frozen):
    reason: str = "cancelled by user"


class WebhookReceivedData(_Frozen):
    """fal's webhook body (shared/fal-protocol.md §5), after its signature was verified.

    ``delivery`` identifies one signed delivery (a hash of its signature): it is part of the
    msg id, so the same delivery replayed within the duplicate window is dropped by the server.
    """

    request_id: str
    status: Literal["OK", "ERROR"]
    delivery: str
    payload: dict[str, Any] | None = None
    error: str | None = None
    payload_error: str | None = None


# --- events -----------------------------------------------------------------------------


class TaskRequested(FluxEvent):
    token: ClassVar[str] = "requested"
    type: Literal["task.requested"] = "task.requested"
    data: TaskRequestedData


class TaskSubmitted(FluxEvent):
    token: ClassVar[str] = "submitted"
    type: Literal["task.submitted"] = "task.submitted"
    data: TaskSubmittedData


class TaskStatusChanged(FluxEvent):
    token: ClassVar[str] = "status"
    type: Literal["task.status_changed"] = "task.status_changed"
    data: TaskStatusChangedData

    @property
    def msg_id(self) -> str:
        return f"{self.task_id}.{self.token}.{self.data.seq}"


class TaskCompleted(FluxEvent):
    token: ClassVar[str] = "completed"
    terminal: ClassVar[bool] = True
    type: Literal["task.completed"] = "task.completed"
    data: TaskCompletedData


class TaskFailed(FluxEvent):
    token: ClassVar[str] = "failed"
    terminal: ClassVar[bool] = True
    type: Literal["task.failed"] = "task.failed"
    data: TaskFailedData


class ImagesStored(FluxEvent):
    token: ClassVar[str] = "stored"
    type: Literal["task.images_stored"] = "task.images_stored"
    data: ImagesStoredData


class StorageFailed(FluxEvent):
    token: ClassVar[str] = "storage_failed"
    type: Literal["task.storage_failed"] = "task.storage_failed"
    data: StorageFailedData


class TaskCancelled(FluxEvent):
    token: ClassVar[str] = "cancelled"
    terminal: ClassVar[bool] = True
    type: Literal["task.cancelled"] = "task.cancelled"
    data: TaskCancelledData


# --- the unified history: other generators' items, and hiding an item ----------------------
#
# Not about one of our tasks: ``task_id`` is the item's id in its generator (for a Flux item,
# our task id). They live on ``<prefix>.history.<source>.<item>.<token>``, which the projector
# follows and no worker consumes.

HistorySource = Literal["flux", "midjourney", "jimeng"]
ExternalSource = Literal["midjourney", "jimeng"]
_SUBJECT_SAFE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def subject_token(item_id: str) -> str:
    """``item_id`` as one subject token: itself when it is safe there, else a digest of it."""
    if _SUBJECT_SAFE.fullmatch(item_id):
        return item_id
    return "h" + hashlib.sha256(item_id.encode()).hexdigest()[:40]


class HistoryItemRecordedData(_Frozen):
    source: ExternalSource
    status: TaskStatus
    model: str | None = None
    prompt: str | None = None
    image_url: str | None = Field(None, description="the generator's (provider's) image URL")
    cloud_image_url: str | None = Field(None, description="our storage's copy, preferred when present")
    created_at: datetime


class HistoryItemHiddenData(_Frozen):
    source: HistorySource


class HistoryEvent(FluxEvent):
    """An event of the unified history, on ``<prefix>.history.<source>.<item>.<token>``."""

    data: HistoryItemRecordedData | HistoryItemHiddenData

    @property
    def source(self) -> str:
        """The generator the item belongs to; every history payload names it."""
        return self.data.source

    def subject(self, prefix: str) -> str:
        return f"{prefix}.history.{self.source}.{subject_token(self.task_id)}.{self.token}"

    @property
    def msg_id(self) -> str:
        return f"history.{self.source}.{subject_token(self.task_id)}.{self.token}"


class HistoryItemRecorded(HistoryEvent):
    """An item of another generator (Midjourney, Jimeng), as its backend or an import saw it.

    ``msg_id`` carries a digest of the data: the same item recorded twice with the same data is
    one event, a changed item (a later status, a stored copy) is a new one."""

    token: ClassVar[str] = "recorded"
    type: Literal["history.item_recorded"] = "history.item_recorded"
    data: HistoryItemRecordedData

    @property
    def msg_id(self) -> str:
        digest = hashlib.sha256(self.data.model_dump_json().encode()).hexdigest()[:16]
        return f"{super().msg_id}.{digest}"


class HistoryItemHidden(HistoryEvent):
    """The item's owner (``user_id``) hid it from their unified history."""

    token: ClassVar[str] = "hidden"
    type: Literal["history.item_hidden"] = "history.item_hidden"
    data: HistoryItemHiddenData


# --- configuration and credits: not about one task, so on their own subjects ----------------
#
# ``task_id`` is ``NO_TASK`` for events that are about no task (a config change, a grant).


NO_TASK = "-"


class ConfigChangedData(_Frozen):
    """The whole provider configuration after a change (not a diff), so the last message on
    ``<prefix>.config.changed`` is all a service needs. The fal key travels only as Fernet
    ciphertext (``api_key_encrypted``); ``None`` means "use the ``FAL_KEY`` setting"."""

    base_url: str
    enabled: bool
    timeout: int = Field(ge=1)
    max_concurrent_tasks: int = Field(ge=1)
    default_model: str
    credit_costs: dict[str, int] = Field(default_factory=dict)
    api_key_encrypted: str | None = None
    changed: tuple[str, ...] = ()


class ConfigChanged(FluxEvent):
    """An admin changed the configuration; ``user_id`` is who."""

    token: ClassVar[str] = "changed"
    type: Literal["config.changed"] = "config.changed"
    data: ConfigChangedData

    def subject(self, prefix: str) -> str:
        return f"{prefix}.config.changed"

    @property
    def msg_id(self) -> str:
        return f"config.{self.event_id}"


class LedgerState(_Frozen):
    """A user's ledger after a movement: what is spendable, what was ever charged, and the
    credits held by each task not yet ended (task id -> amount; 0 when only a slot is held)."""

    balance_after: int = Field(ge=0)
    used_after: int = Field(ge=0)
    open_after: dict[str, int] = Field(default_factory=dict)


class CreditsGrantedData(LedgerState):
    amount: int
    actor: str
    reason: str = Field(min_length=1, max_length=500)


class CreditsHeldData(LedgerState):
    amount: int = Field(ge=0)
    model: str
    request: TaskRequested


class CreditsSettledData(LedgerState):
    amount: int = Field(ge=0)


class _LedgerEvent(FluxEvent):
    """One movement on the user's ledger subject ``<prefix>.credits.<user>``."""

    def subject(self, prefix: str) -> str:
        return f"{prefix}.credits.{ledger_token(self.user_id)}"


class CreditsGranted(_LedgerEvent):
    """An admin (``data.actor``) granted or, with a negative amount, took back credits."""

    token: ClassVar[str] = "granted"
    type: Literal["credits.granted"] = "credits.granted"
    data: CreditsGrantedData

    @property
    def msg_id(self) -> str:
        return f"credits.granted.{self.event_id}"


class CreditsHeld(_LedgerEvent):
    """A job's cost held at request time; carries the request so a sweeper can publish it."""

    token: ClassVar[str] = "held"
    type: Literal["credits.held"] = "credits.held"
    data: CreditsHeldData

    @property
    def msg_id(self) -> str:
        return f"credits.{self.task_id}.held"


class _Settled(_LedgerEvent):
    """A charge or a refund: they share the msg id ``credits.<task>.settled``, so whichever is
    published first is the only one the server keeps (within the duplicate window)."""

    data: CreditsSettledData

    @property
    def msg_id(self) -> str:
        return f"credits.{self.task_id}.settled"


class CreditsCharged(_Settled):
    """The held cost of a task that succeeded, spent for good."""

    token: ClassVar[str] = "charged"
    type: Literal["credits.charged"] = "credits.charged"


class CreditsRefunded(_Settled):
    """The held cost of a task that failed or was cancelled, given back."""

    token: ClassVar[str] = "refunded"
    type: Literal["credits.refunded"] = "credits.refunded"


LedgerEvent = CreditsGranted | CreditsHeld | CreditsCharged | CreditsRefunded


def ledger_token(user_id: str) -> str:
    """The user's subject token: the id itself when it is a safe token, else a hash of it."""
    if _SAFE_TOKEN.fullmatch(user_id) and not user_id.startswith("h-"):
        return user_id
    return "h-" + hashlib.sha256(user_id.encode()).hexdigest()[:40]


_SAFE_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")


class WebhookReceived(FluxEvent):
    """fal said the task's request ended (verified webhook); the poller turns it into the
    terminal event. Repeatable (fal retries deliveries), one per signed delivery."""

    token: ClassVar[str] = "webhook"
    type: Literal["task.webhook_received"] = "task.webhook_received"
    data: WebhookReceivedData

    @property
    def msg_id(self) -> str:
        return f"{self.task_id}.{self.token}.{self.data.delivery}"


EVENT_TYPES: tuple[type[FluxEvent], ...] = (
    TaskRequested,
    TaskSubmitted,
    TaskStatusChanged,
    TaskCompleted,
    TaskFailed,
    ImagesStored,
    StorageFailed,
    TaskCancelled,
    HistoryItemRecorded,
    HistoryItemHidden,
    ConfigChanged,
    CreditsGranted,
    CreditsHeld,
    CreditsCharged,
    CreditsRefunded,
    WebhookReceived,
)
TERMINAL_TOKENS: tuple[str, ...] = tuple(t.token for t in EVENT_TYPES if t.terminal)
SUPPORTED_VERSIONS: dict[str, int] = {t.model_fields["type"].default: 1 for t in EVENT_TYPES}
_TYPE_NAMES: dict[type[FluxEvent], str] = {t: t.model_fields["type"].default for t in EVENT_TYPES}

AnyEvent = Annotated[
    TaskRequested
    | TaskSubmitted
    | TaskStatusChanged
    | TaskCompleted
    | TaskFailed
    | ImagesStored
    | StorageFailed
    | TaskCancelled
    | HistoryItemRecorded
    | HistoryItemHidden
    | ConfigChanged
    | CreditsGranted
    | CreditsHeld
    | CreditsCharged
    | CreditsRefunded
    | WebhookReceived,
    Field(discriminator="type"),
]
_adapter: TypeAdapter[Any] = TypeAdapter(AnyEvent)


class UnknownEvent(ValueError):
    """The payload is not an event this code understands (type, version or shape)."""


def decode_event(raw: bytes | str) -> FluxEvent:
    """Decode one event from JSON; raise ``UnknownEvent`` with the reason if we cannot."""
    try:
        event: FluxEvent = _adapter.validate_json(raw)
    except ValidationError as exc:
        raise UnknownEvent(_first_error(exc)) from exc
    type_name = _TYPE_NAMES[type(event)]  # model_fields per event was an eighth of decoding
    expected = SUPPORTED_VERSIONS[type_name]
    if event.version != expected:
        raise UnknownEvent(f"{type_name} version {event.version} is not supported (expected {expected})")
    return event


def encode_event(event: FluxEvent) -> bytes:
    return event.model_dump_json().encode()


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    return f"{loc}: {err['msg']}" if loc else err["msg"]
