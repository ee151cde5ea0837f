"""JetStream plumbing shared by every service: the stream, publishing, consuming, reading back.

Invariants:
- The stream and every durable consumer are declared here, in code, and applied idempotently
  at start (``ensure_stream``, ``Consumer``). An existing stream is only checked (subjects,
  retention), never rewritten: its limits belong to the operator once it exists.
- Every publish carries ``Nats-Msg-Id`` = the event's deterministic ``msg_id``; a publish
  retried after a crash inside the duplicate window is dropped by the server.
- A handled message is acked only after the handler returned, i.e. after its effect is done
  and its events are published. A handler that raises gets the message redelivered with
  backoff; after ``max_deliver`` attempts (or at once for an undecodable message) it is
  copied to ``<prefix>.dlq.<durable>`` with the reason and terminated. Nothing is dropped
  silently and nothing loops forever.
- On stop, handlers get ``grace`` seconds to finish (those only following a task, inside
  ``hold``, none); the rest are cancelled and their messages nak'd, so another replica takes
  them over at once.
- A re-driven dead letter (``fluxpipe dlq redrive``) is the original event republished on its
  own subject with a ``Fluxpipe-Redrive-Of`` header: its consumer handles it like any
  redelivery (handlers are idempotent; ``origin_seq`` gives the original position), and
  readers of the log skip it (``is_redrive``), so it is never a second event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError, NotFoundError

from schemas.events import FluxEvent, UnknownEvent, decode_event, encode_event
from services.common.metrics import (
    CONSUMER_ACK_PENDING,
    CONSUMER_PENDING,
    CONSUMER_REDELIVERED,
    EVENTS_FAILED,
    EVENTS_HANDLED,
    IN_FLIGHT,
)
from services.common.settings import Settings

log = logging.getLogger(__name__)

DUPLICATE_WINDOW_SECONDS = 10 * 60


class NatsCredentialsRejected(RuntimeError):
    """NATS refused this process's user or password: a configuration error, so fail at once."""


class PermanentError(Exception):
    """A message that will never succeed: dead-letter it now instead of retrying."""


@dataclass
class Bus:
    """A connection to NATS plus the names this deployment uses."""

    nc: NATS
    js: JetStreamContext
    stream: str
    prefix: str

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
        for token in tokens:
            if await self.last_event(task_id, token) is not None:
                return True
        return False

    async def wait_for_any(
        self, task_id: str, tokens: tuple[str, ...], *, until: datetime | None = None, recheck: float = 30.0
    ) -> bool:
        """Wait until the task has an event of one of these kinds (True) or ``until`` passes (False).

        Woken by a live subscription to the task's subjects; the stream is re-read every
        ``recheck`` seconds too, in case a reconnect lost the live message.
        """
        arrived = asyncio.Event()

        async def on_event(msg: Msg) -> None:
            if msg.subject.rsplit(".", 1)[-1] in tokens:
                arrived.set()

        sub = await self.nc.subscribe(self.task_subject(task_id, "*"), cb=on_event)
        try:
            # The server must know the subscription before the stream is read, or an event
            # published between the two is neither read nor delivered (until ``recheck``).
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await self.nc.flush(timeout=5)
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
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

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


Handler = Callable[[FluxEvent, Msg], Awaitable[None]]

IDLE_POLL, BUSY_POLL = 1.0, 0.1
CRASH_FACTOR = 3


@dataclass
class Consumer:
    """A durable pull consumer and the loop that feeds its messages to one handler.

    ``max_ack_pending`` caps how many messages are in flight across every replica of the
    service; ``concurrency`` caps how many this process handles at once. Long handlers keep
    their message alive with ``in_progress`` heartbeats (see ``hold``).

    ``max_deliver`` is enforced here, not by the server (whose limit is unlimited): a message
    held across restarts is redelivered each time and must never be silently parked by the
    server; a handler that keeps failing is dead-lettered once it reaches ``max_deliver``, and
    ``on_dead_letter`` (if given) is then called with the bus, the event and the reason.
    """

    durable: str
    token: str
    ack_wait: float = 30.0
    max_deliver: int = 10
    max_ack_pending: int = 1000
    concurrency: int = 64
    backoff: tuple[float, ...] = (1, 2, 5, 10, 30)
    grace: float = 5.0
    on_dead_letter: Callable[[Bus, FluxEvent, str], Awaitable[None]] | None = None
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)

    def config(self, bus: Bus) -> api.ConsumerConfig:
        return api.ConsumerConfig(
            durable_name=self.durable,
            name=self.durable,
            filter_subject=bus.task_subject("*", self.token),
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_wait=self.ack_wait,
            max_deliver=-1,
            max_ack_pending=self.max_ack_pending,
        )

    async def ensure(self, bus: Bus) -> None:
        config = self.config(bus)
        try:
            await bus.js.add_consumer(bus.stream, config)
        except BadRequestError:
            info = await bus.js.consumer_info(bus.stream, self.durable)
            merged = info.config
            for key in ("ack_wait", "max_deliver", "max_ack_pending", "filter_subject"):
                setattr(merged, key, getattr(config, key))
            await bus.js.add_consumer(bus.stream, merged)

    def stop(self) -> None:
        self._stopping.set()

    async def serve(self, bus: Bus, handler: Handler, stop: asyncio.Event) -> None:
        """``run`` until ``stop`` is set."""
        runner = asyncio.create_task(self.run(bus, handler))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({runner, stopping}, return_when=asyncio.FIRST_COMPLETED)
        self.stop()
        stopping.cancel()
        await runner

    async def run(self, bus: Bus, handler: Handler) -> None:
        """Fetch and handle messages until ``stop()``; in-flight handlers then get ``grace`` seconds."""
        await self.ensure(bus)
        sub = await bus.js.pull_subscribe_bind(durable=self.durable, stream=bus.stream)
        running: set[asyncio.Task[None]] = set()
        stopping = asyncio.create_task(self._stopping.wait())
        gauges = asyncio.create_task(self._refresh_gauges(bus))
        log.info("consumer %s started on %s", self.durable, bus.task_subject("*", self.token))
        while not self._stopping.is_set():
            room = self.concurrency - len(running)
            if room <= 0:
                # Every slot is taken (possibly by messages held for minutes): wake on a free
                # slot or on stop, never on one alone.
                await asyncio.wait({*running, stopping}, return_when=asyncio.FIRST_COMPLETED)
                continue
            # A pull asks for at most ``room`` messages and a slot freed meanwhile is not
            # refilled until it returns: long-poll only when idle, poll briefly when busy.
            try:
                msgs = await sub.fetch(min(room, 64), timeout=IDLE_POLL if not running else BUSY_POLL)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except Exception:  # connection blips: nats-py reconnects on its own
                log.exception("fetch failed on %s", self.durable)
                await asyncio.sleep(1)
                continue
            for msg in msgs:
                task = asyncio.create_task(self._handle(bus, handler, msg))
                running.add(task)
                task.add_done_callback(running.discard)
        stopping.cancel()
        gauges.cancel()
        for task in [t for t in running if t in _HOLDING]:
            task.cancel()  # only waiting on a task at fal: hand the message back now
        if running:
            _, late = await asyncio.wait(running, timeout=self.grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*running, *late, return_exceptions=True)
        with contextlib.suppress(Exception):
            await sub.unsubscribe()

    async def _handle(self, bus: Bus, handler: Handler, msg: Msg) -> None:
        delivered = msg.metadata.num_delivered
        try:
            event = decode_event(msg.data)
        except UnknownEvent as exc:
            await self._dead_letter(bus, msg, f"undecodable event: {exc}")
            return
        if delivered > CRASH_FACTOR * self.max_deliver:
            # Far more deliveries than failures allow: the handler never got to fail, so the
            # message is probably killing its worker (restarts also count, hence the margin).
            await self._dead_letter(bus, msg, f"delivered {delivered} times without finishing", event)
            return
        try:
            with IN_FLIGHT.labels(self.durable).track_inprogress():
                await handler(event, msg)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await msg.nak()
            raise
        except PermanentError as exc:
            await self._dead_letter(bus, msg, str(exc), event)
            return
        except Exception as exc:
            if delivered >= self.max_deliver:
                await self._dead_letter(bus, msg, f"gave up after {delivered} deliveries: {exc!r}", event)
                return
            delay = self.backoff[min(delivered, len(self.backoff)) - 1]
            EVENTS_FAILED.labels(self.durable, "retry").inc()
            log.warning(
                "%s failed on %s (delivery %d), retrying in %ss: %r",
                self.durable,
                msg.subject,
                delivered,
                delay,
                exc,
            )
            with contextlib.suppress(Exception):
                await msg.nak(delay=delay)
            return
        with contextlib.suppress(Exception):
            await msg.ack_sync()
        EVENTS_HANDLED.labels(self.durable).inc()

    async def _refresh_gauges(self, bus: Bus, every: float = 5.0) -> None:
        """Keep the consumer's lag and pending gauges current (read from the server)."""
        while True:
            await asyncio.sleep(every)
            with contextlib.suppress(Exception):
                info = await bus.js.consumer_info(bus.stream, self.durable)
                CONSUMER_PENDING.labels(self.durable).set(info.num_pending or 0)
                CONSUMER_ACK_PENDING.labels(self.durable).set(info.num_ack_pending or 0)
                CONSUMER_REDELIVERED.labels(self.durable).set(info.num_redelivered or 0)

    async def _dead_letter(self, bus: Bus, msg: Msg, reason: str, event: FluxEvent | None = None) -> None:
        """Park the message with the reason, then let ``on_dead_letter`` end its task (a task
        whose next step was dead-lettered must not stay unfinished forever)."""
        EVENTS_FAILED.labels(self.durable, "dead_letter").inc()
        await bus.dead_letter(self.durable, msg.subject, msg.metadata.sequence.stream, msg.data, reason)
        if event is not None and self.on_dead_letter is not None:
            try:
                await self.on_dead_letter(bus, event, reason)
            except Exception:
                # Redo it all later (the dead letter is de-duplicated by its msg id): ending the
                # task must not be lost to a blip.
                log.exception("%s could not end task %s after dead-lettering it", self.durable, event.task_id)
                with contextlib.suppress(Exception):
                    await msg.nak(delay=self.backoff[-1])
                return
        await msg.term()


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


_HOLDING: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()


@contextlib.asynccontextmanager
async def hold(msg: Msg, every: float, *, interruptible: bool = True) -> AsyncIterator[None]:
    """Keep ``msg`` from being redelivered while a long effect runs (``in_progress`` heartbeats).

    An ``interruptible`` body must be safe to cut short and redo (it follows a task; its
    publishes are idempotent): a stopping ``Consumer`` cancels it at once, without ``grace``,
    and its message goes straight to another replica. Anything else (a submit to fal) gets
    the grace period to finish.
    """

    async def beat() -> None:
        while True:
            await asyncio.sleep(every)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    current = asyncio.current_task() if interruptible else None
    if current is not None:
        _HOLDING.add(current)
    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        if current is not None:
            _HOLDING.discard(current)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
