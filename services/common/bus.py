"""JetStream plumbing shared by every service: the stream, publishing, reading back, dead
letters. The consumer loop is ``services/common/consumer.py``.

Invariants:
- The stream is declared here, in code, and created at start (``ensure_stream``). An
  existing stream is only checked (subjects, retention), never rewritten: its limits belong
  to the operator once it exists.
- Every publish carries ``Nats-Msg-Id`` = the event's deterministic ``msg_id``; a publish
  retried after a crash inside the duplicate window is dropped by the server.
- A task's state is read back in one round trip (``latest``: a batched direct get of the last
  event of each kind), and waits on a task's events share one subscription per event kind per
  process (``watching``), never a subscription per task: per-task reads are the hot path.
  With a replicated stream a direct get may be answered by a follower a few milliseconds
  behind the leader. Nothing depends on reading one's own latest write: a redelivery comes
  seconds later, a terminal event missed by a stale read is refused as a duplicate (all of a
  task's ends share one msg id), and a cancel missed by the submitter is found when it waits
  on the task and is sent on to fal.
- A re-driven dead letter (``fluxpipe dlq redrive``) is the original event republished on its
  own subject with a ``Fluxpipe-Redrive-Of`` header: its consumer handles it like any
  redelivery (handlers are idempotent; ``origin_seq`` gives the original position), and
  readers of the log skip it (``is_redrive``), so it is never a second event.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError, NotFoundError

from schemas.events import FluxEvent, decode_event, encode_event
from services.common.settings import Settings

log = logging.getLogger(__name__)

DUPLICATE_WINDOW_SECONDS = 10 * 60
# Set once this process has connected to NATS: before that a stopping service has nothing to
# finish (services/common/runtime.py).
REACHED_NATS = asyncio.Event()
DIRECT_GET_TIMEOUT = 10.0  # as long as any other JetStream API call (``nc.jetstream(timeout=10)``)


class NatsCredentialsRejected(RuntimeError):
    """NATS refused this process's user or password: a configuration error, so fail at once."""


class PermanentError(Exception):
    """A message that will never succeed: dead-letter it now instead of retrying."""


@dataclass(frozen=True)
class TaskLatest:
    """The latest event of each kind a task has: token → (stream sequence, raw data)."""

    raw: dict[str, tuple[int, bytes]]

    def has_any(self, tokens: Iterable[str]) -> bool:
        return any(t in self.raw for t in tokens)

    def event(self, token: str) -> FluxEvent | None:
        found = self.raw.get(token)
        return decode_event(found[1]) if found else None


@dataclass
class _Batch:
    """The replies to one batched direct get, until the server's end-of-batch."""

    msgs: list[Msg]
    done: asyncio.Future[list[Msg]]


@dataclass
class Bus:
    """A connection to NATS plus the names this deployment uses."""

    nc: NATS
    js: JetStreamContext
    stream: str
    prefix: str
    _reply_prefix: str | None = field(default=None, init=False, repr=False)
    _batches: dict[str, _Batch] = field(default_factory=dict, init=False, repr=False)
    _batch_ids: itertools.count[int] = field(default_factory=itertools.count, init=False, repr=False)
    _watched: set[str] = field(default_factory=set, init=False, repr=False)
    _watchers: dict[str, list[tuple[frozenset[str], asyncio.Event]]] = field(
        default_factory=dict, init=False, repr=False
    )
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False, repr=False)

    @classmethod
    async def connect(
        cls, settings: Settings, name: str, *, ensure: bool = True, reconnect: bool = True
    ) -> Bus:
        """Connect; with ``ensure`` (services) also declare the stream, without it (read-only tools)
        not. Services reconnect forever; a tool (``reconnect=False``) fails at once instead."""
        if reconnect:
            options: dict[str, Any] = {"max_reconnect_attempts": -1, "reconnect_time_wait": 1}
        else:
            # nats-py keeps retrying a first connect unless this is > 0 (0 and -1 mean forever).
            options = {"max_reconnect_attempts": 1, "reconnect_time_wait": 0.5, "connect_timeout": 3}

        if settings.nats_user:
            options["user"] = settings.nats_user
            options["password"] = settings.nats_password.get_secret_value()
        connecting = True

        async def on_error(exc: Exception) -> None:
            if connecting and "authorization violation" in str(exc).lower():
                raise NatsCredentialsRejected(
                    f"NATS at {settings.nats_url} refused the credentials of {name} "
                    f"(NATS_USER={settings.nats_user or '(unset)'}): check NATS_USER / NATS_PASSWORD"
                ) from exc
            if reconnect:
                log.error("nats: %r", exc)
            else:
                log.debug("nats: %r", exc)

        servers = [url.strip() for url in settings.nats_url.split(",") if url.strip()]  # a cluster
        nc = await nats.connect(servers, name=f"fluxpipe-{name}", error_cb=on_error, **options)
        connecting = False
        REACHED_NATS.set()
        bus = cls(
            nc=nc, js=nc.jetstream(timeout=10), stream=settings.stream_name, prefix=settings.subject_prefix
        )
        if ensure:
            await bus.ensure_stream(
                replicas=settings.stream_replicas,
                max_age=settings.stream_max_age_seconds,
                max_bytes=settings.stream_max_bytes,
            )
        return bus

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.nc.drain()

    def task_subject(self, task_id: str = "*", token: str = ">") -> str:
        return f"{self.prefix}.task.{task_id}.{token}"

    def dlq_subject(self, durable: str) -> str:
        return f"{self.prefix}.dlq.{durable}"

    def events_subject(self) -> str:
        """Every subject of the stream: task events, and whatever other event families
        (credits, configuration, other generators' history) live beside them. Dead letters
        share it; ``is_dead_letter`` tells them apart."""
        return f"{self.prefix}.>"

    def is_dead_letter(self, subject: str) -> bool:
        return subject.startswith(f"{self.prefix}.dlq.")

    def redriven_subject(self, durable: str = "*", letter_seq: int | str = "*") -> str:
        """The marker ``fluxpipe dlq redrive`` leaves for a re-driven letter of ``durable``: one
        subject per letter, so a second re-drive of the same letter is refused by the server."""
        return f"{self.prefix}.dlq.redriven.{durable}.{letter_seq}"

    async def ensure_stream(
        self, replicas: int = 1, *, max_age: float = 0.0, max_bytes: int = -1
    ) -> api.StreamInfo:
        """Create the stream if it is missing; an existing one is only checked, never changed,
        so limits an operator set (``nats stream edit``) survive every service start.

        Retention: ``limits`` with ``max_age`` / ``max_bytes`` (0 / -1 = keep everything, the
        default: the log is the source of truth and ``fluxpipe replay`` rebuilds from it);
        past a limit the oldest events are discarded.
        """
        try:
            info = await self.js.stream_info(self.stream)
        except NotFoundError:
            config = api.StreamConfig(
                name=self.stream,
                subjects=[f"{self.prefix}.>"],
                retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.FILE,
                num_replicas=replicas,
                duplicate_window=DUPLICATE_WINDOW_SECONDS,
                allow_direct=True,
                max_age=max_age or None,
                max_bytes=max_bytes,
                discard=api.DiscardPolicy.OLD,
            )
            try:
                return await self.js.add_stream(config)
            except BadRequestError:  # created meanwhile by another service
                info = await self.js.stream_info(self.stream)
        self.check_stream(info)
        return info

    def check_stream(self, info: api.StreamInfo) -> None:
        """What must hold of an existing stream for the pipeline to work at all."""
        config = info.config
        wanted = f"{self.prefix}.>"
        if wanted not in (config.subjects or []):
            raise RuntimeError(
                f"stream {self.stream} does not capture {wanted!r} (its subjects: {config.subjects}); "
                "fix the stream or FLUXPIPE_SUBJECT_PREFIX"
            )
        if config.retention not in (None, api.RetentionPolicy.LIMITS):
            raise RuntimeError(
                f"stream {self.stream} has retention {config.retention}; the event log needs 'limits' "
                "(every consumer reads every event)"
            )

    async def dead_letter(self, durable: str, subject: str, seq: int, data: bytes, reason: str) -> None:
        """Copy a message ``durable`` will never apply to ``<prefix>.dlq.<durable>``, with why."""
        log.error("dead-lettering %s (stream seq %s) from %s: %s", subject, seq, durable, reason)
        await self.js.publish(
            self.dlq_subject(durable),
            data,
            stream=self.stream,
            headers={
                "Nats-Msg-Id": f"dlq.{durable}.{seq}",
                "Fluxpipe-Reason": reason[:1000],
                "Fluxpipe-Subject": subject,
                "Fluxpipe-Stream-Seq": str(seq),
            },
        )

    async def publish(self, event: FluxEvent) -> api.PubAck:
        """Publish one event; idempotent within the duplicate window."""
        return await self.js.publish(
            event.subject(self.prefix),
            encode_event(event),
            stream=self.stream,
            headers={"Nats-Msg-Id": event.msg_id},
        )

    async def last_event(self, task_id: str, token: str) -> FluxEvent | None:
        """The latest event of one kind for a task, read straight from the stream."""
        try:
            raw = await self.js.get_last_msg(self.stream, self.task_subject(task_id, token))
        except NotFoundError:
            return None
        assert raw.data is not None
        return decode_event(raw.data)

    async def first_seq(self, task_id: str, token: str) -> int | None:
        """The stream sequence of the task's first event of one kind."""
        try:
            raw = await self.js.get_msg(
                self.stream, seq=1, subject=self.task_subject(task_id, token), next=True
            )
        except NotFoundError:
            return None
        return raw.seq

    async def has_any(self, task_id: str, tokens: tuple[str, ...]) -> bool:
        """Whether the stream holds any event of these kinds for the task."""
        return (await self.latest(task_id)).has_any(tokens)

    async def latest(self, task_id: str) -> TaskLatest:
        """The last event of every kind the task has, in one round trip: a batched direct get
        with ``multi_last`` over the task's subjects (the same messages ``last_event`` reads)."""
        msgs = await self._direct_batch({"multi_last": [self.task_subject(task_id, "*")]})
        raw: dict[str, tuple[int, bytes]] = {}
        for msg in msgs:
            headers = msg.headers or {}
            raw[headers["Nats-Subject"].rsplit(".", 1)[-1]] = (int(headers["Nats-Sequence"]), msg.data)
        return TaskLatest(raw)

    async def _direct_batch(self, request: dict[str, Any]) -> list[Msg]:
        """Send a batched direct get; its replies, up to the server's end-of-batch (none for
        "no results"). Replies come on one shared inbox subscription per connection."""
        if self._reply_prefix is None:
            async with self._lock:
                if self._reply_prefix is None:
                    prefix = self.nc.new_inbox()
                    await self.nc.subscribe(f"{prefix}.*", cb=self._on_batch_reply)
                    self._reply_prefix = prefix
        batch_id = str(next(self._batch_ids))
        batch = _Batch([], asyncio.get_running_loop().create_future())
        self._batches[batch_id] = batch
        try:
            await self.nc.publish(
                f"$JS.API.DIRECT.GET.{self.stream}",
                json.dumps(request).encode(),
                reply=f"{self._reply_prefix}.{batch_id}",
            )
            async with asyncio.timeout(DIRECT_GET_TIMEOUT):
                return await batch.done
        finally:
            del self._batches[batch_id]

    async def _on_batch_reply(self, msg: Msg) -> None:
        batch = self._batches.get(msg.subject.rsplit(".", 1)[-1])
        if batch is None or batch.done.done():
            return  # a late reply to a batch that timed out
        status = (msg.headers or {}).get("Status")
        if status is None:
            batch.msgs.append(msg)
        elif status in ("204", "404"):  # end of batch; no results
            batch.done.set_result(batch.msgs)
        else:
            description = (msg.headers or {}).get("Description", "")
            batch.done.set_exception(nats.errors.Error(f"direct get failed: {status} {description}"))

    @contextlib.asynccontextmanager
    async def watching(self, task_id: str, tokens: tuple[str, ...]) -> AsyncIterator[asyncio.Event]:
        """An event set whenever the task gets an event of one of these kinds, from the moment
        this is entered (the server knows the subscription before it returns). One
        subscription per kind serves every task this process waits on."""
        async with self._lock:
            new = [t for t in tokens if t not in self._watched]
            for token in new:
                await self.nc.subscribe(self.task_subject("*", token), cb=self._on_watched)
                self._watched.add(token)
            if new:
                with contextlib.suppress(nats.errors.Error, TimeoutError):
                    await self.nc.flush(timeout=5)
        arrived = asyncio.Event()
        entry = (frozenset(tokens), arrived)
        self._watchers.setdefault(task_id, []).append(entry)
        try:
            yield arrived
        finally:
            waiting = self._watchers[task_id]
            waiting.remove(entry)
            if not waiting:
                del self._watchers[task_id]

    async def _on_watched(self, msg: Msg) -> None:
        _, _, task_id, token = msg.subject.rsplit(".", 3)
        for tokens, arrived in self._watchers.get(task_id, ()):
            if token in tokens:
                arrived.set()

    async def wait_for_any(
        self, task_id: str, tokens: tuple[str, ...], *, until: datetime | None = None, recheck: float = 30.0
    ) -> bool:
        """Wait until the task has an event of one of these kinds (True) or ``until`` passes (False).

        Woken by a live subscription (``watching``, entered before the stream is read, so an
        event published between the two is not missed); the stream is re-read every ``recheck``
        seconds too, in case a reconnect lost the live message.
        """
        async with self.watching(task_id, tokens) as arrived:
            while not await self._has_any_or_unknown(task_id, tokens):
                wait = recheck
                if until is not None:
                    left = (until - datetime.now(UTC)).total_seconds()
                    if left <= 0:
                        return False
                    wait = min(wait, left)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(arrived.wait(), wait)
                arrived.clear()
            return True

    async def _has_any_or_unknown(self, task_id: str, tokens: tuple[str, ...]) -> bool:
        """``has_any``, but a NATS hiccup reads as "not yet": a long wait must not fail over it
        (a held message may have been redelivered often, and would be dead-lettered)."""
        try:
            return await self.has_any(task_id, tokens)
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("reading task %s from the stream failed, will look again: %r", task_id, exc)
            return False

    async def task_story(self, task_id: str) -> list[tuple[int, FluxEvent]]:
        """Every event of one task in stream order, with its stream sequence."""
        return [(seq, decode_event(data)) async for seq, _, data in self.iter_raw(self.task_subject(task_id))]

    async def follow_story(self, task_id: str) -> AsyncIterator[tuple[int, FluxEvent]]:
        """A task's events in stream order, the stored ones and then live ones as they are
        published, until its story is complete: failed or cancelled, or completed and then
        stored (or storage failed). Waits for the first event if there is none yet."""
        sub = await self.js.subscribe(
            self.task_subject(task_id),
            stream=self.stream,
            ordered_consumer=True,
            config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL),
        )
        completed = False
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=5)
                except nats.errors.TimeoutError:
                    continue
                event = decode_event(msg.data)
                yield msg.metadata.sequence.stream, event
                if event.token in ("failed", "cancelled") or (
                    completed and event.token in ("stored", "storage_failed")
                ):
                    return
                completed = completed or event.token == "completed"
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def iter_raw(self, subject: str, start_seq: int = 1) -> AsyncIterator[tuple[int, str, bytes]]:
        """Stored messages matching ``subject`` from ``start_seq`` on: (sequence, subject, data)."""
        seq = start_seq
        while True:
            try:
                raw = await self.js.get_msg(self.stream, seq=seq, subject=subject, next=True)
            except NotFoundError:
                return
            assert raw.seq is not None and raw.subject is not None
            yield raw.seq, raw.subject, raw.data or b""
            seq = raw.seq + 1


REDRIVE_OF = "Fluxpipe-Redrive-Of"


def is_redrive(headers: dict[str, str] | None) -> bool:
    """Whether a message is a re-driven copy of an event (``fluxpipe dlq redrive``): for its
    consumer a redelivery, for every reader of the log (projector, replay) not a new event."""
    return bool(headers and REDRIVE_OF in headers)


def origin_seq(msg: Msg) -> int:
    """The stream sequence of the event ``msg`` carries: its own, or for a re-driven copy the
    original event's (``Fluxpipe-Stream-Seq``)."""
    original = (msg.headers or {}).get("Fluxpipe-Stream-Seq") if is_redrive(msg.headers) else None
    return int(original) if original else msg.metadata.sequence.stream
