"""Live progress as server-sent events, read from JetStream (never by polling the database).

- ``GET /api/flux/task/{id}/events``: the task's story from its first event, live until it
  is complete (failed or cancelled, or completed and then stored or storage failed); then the
  response ends.
- ``GET /api/flux/events``: every change of every task of the caller, live, never ending.

Invariants:
- Each SSE ``id`` is the event's stream sequence. A reconnect with ``Last-Event-ID: N`` starts
  an ordered consumer at N + 1 over the same subjects, so nothing is missed or repeated.
- A reconnect to a story already complete at ``Last-Event-ID`` is answered 204, which tells
  an ``EventSource`` to stop reconnecting.
- The owner only: anyone else gets the same 404 as for a task that does not exist.
- Each connection's consumer is removed when the client goes away (the generator is closed).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Annotated

import nats.errors
from fastapi import APIRouter, Header, HTTPException, Response, status
from nats.js import JetStreamContext, api
from sse_starlette import EventSourceResponse, ServerSentEvent

from schemas.events import FluxEvent, TaskRequested, UnknownEvent, decode_event
from services.common.bus import Bus
from services.gateway.deps import BusDep, CurrentUser

router = APIRouter(prefix="/api/flux", tags=["live"])

PING_SECONDS = 15


class Story:
    """Whether a task's story is complete, fed its events in stream order."""

    def __init__(self) -> None:
        self.completed = False
        self.ended = False

    def add(self, event: FluxEvent) -> None:
        if event.token in ("failed", "cancelled") or (
            self.completed and event.token in ("stored", "storage_failed")
        ):
            self.ended = True
        self.completed = self.completed or event.token == "completed"


def _start_at(after: int) -> api.ConsumerConfig:
    if after <= 0:
        return api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL)
    return api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after + 1)


async def _subscribe(bus: Bus, subject: str, config: api.ConsumerConfig) -> JetStreamContext.PushSubscription:
    """An ordered consumer on ``subject``, created before the response starts streaming."""
    return await bus.js.subscribe(subject, stream=bus.stream, ordered_consumer=True, config=config)


async def _messages(sub: JetStreamContext.PushSubscription) -> AsyncIterator[tuple[int, bytes]]:
    """(stream seq, data) of what ``sub`` delivers, forever; unsubscribes when closed."""
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=PING_SECONDS)
            except nats.errors.TimeoutError:
                continue
            yield msg.metadata.sequence.stream, msg.data
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


def _sse(seq: int, event: FluxEvent) -> ServerSentEvent:
    event_type = type(event).model_fields["type"].default
    return ServerSentEvent(data=event.model_dump_json(), event=event_type, id=str(seq))


def _last_event_id(value: str | None) -> int:
    if value is None or value == "":
        return 0
    if not value.isdigit():
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"Last-Event-ID: {value!r} is not an id this stream sent"
        )
    return int(value)


@router.get("/task/{task_id}/events", response_model=None)
async def task_events(
    task_id: str,
    user: CurrentUser,
    bus: BusDep,
    last_event_id: Annotated[str | None, Header(max_length=20)] = None,
) -> Response:
    """The task's events as server-sent events, live until the task's story is complete."""
    after = _last_event_id(last_event_id)
    requested = await bus.last_event(task_id, "requested") if task_id.isalnum() else None
    if not isinstance(requested, TaskRequested) or requested.user_id != user.user_id:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"task {task_id} not found")
    story = Story()
    for seq, event in await bus.task_story(task_id):
        if seq <= after:
            story.add(event)
    if story.ended:
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    sub = await _subscribe(bus, bus.task_subject(task_id), _start_at(after))

    async def stream() -> AsyncIterator[ServerSentEvent]:
        async for seq, data in _messages(sub):
            event = decode_event(data)
            yield _sse(seq, event)
            story.add(event)
            if story.ended:
                return

    return EventSourceResponse(stream(), ping=PING_SECONDS)


@router.get("/events", response_model=None)
async def my_events(
    user: CurrentUser,
    bus: BusDep,
    last_event_id: Annotated[str | None, Header(max_length=20)] = None,
) -> Response:
    """Every change of every task of the caller as server-sent events, from now on (or from
    ``Last-Event-ID``), for a page that shows several tasks at once."""
    after = _last_event_id(last_event_id)
    config = _start_at(after) if after else api.ConsumerConfig(deliver_policy=api.DeliverPolicy.NEW)

    sub = await _subscribe(bus, bus.task_subject(), config)

    async def stream() -> AsyncIterator[ServerSentEvent]:
        yield ServerSentEvent(event="ready", data="{}")  # subscribed: every later change follows
        async for seq, data in _messages(sub):
            try:
                event = decode_event(data)
            except UnknownEvent:
                continue  # not ours to judge here: the projector dead-letters it
            if event.user_id == user.user_id:
                yield _sse(seq, event)

    return EventSourceResponse(stream(), ping=PING_SECONDS)
