"""Reading the log for ``fluxpipe replay`` and folding it in memory (``replay.py``).

Invariants:
- The same subjects the live projector follows are folded, with the read models' own folds
  (``readmodels.py``); dead letters and re-driven copies are skipped, undecodable events
  counted and skipped as the live projector parks them.
- Every sequence up to the target is read, or the read fails: a gap is never folded over.
- A partitioned read folds each task in exactly one process (``partition``), and merging the
  partitions' rebuilds gives what one process would have built.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor

from nats.aio.msg import Msg
from nats.js import api

from schemas.events import UnknownEvent, decode_event, subject_token
from services.common.bus import REDRIVE_OF, Bus, is_redrive
from services.common.settings import Settings
from services.projector.logreader import LogReader, header_names
from services.projector.readmodels import READ_MODELS, ReadModel, Rebuild

log = logging.getLogger(__name__)


STALL = 10.0  # seconds without a message before the replay gives up
REDRIVE = REDRIVE_OF.encode()
MAX_WORKERS = 4  # every process reads the whole log: more only shares out decoding and folding

Say = Callable[[str], None]


class Folding:
    """The read models being rebuilt, and how far the stream has been folded into them."""

    def __init__(self, models: Sequence[ReadModel]) -> None:
        self.models = list(models)
        self.rebuilds: list[tuple[ReadModel, Rebuild]] = [(m, m.rebuild()) for m in self.models]
        self.through = 0
        self.events = 0
        self.skipped = 0
        self.owns: Callable[[bytes], bool] | None = None  # this process's partition of subjects

    def fold(self, seq: int, data: bytes) -> None:
        try:
            event = decode_event(data)
        except UnknownEvent:
            self.skipped += 1  # the live projector parks it: it changes no read model
        else:
            for _, rebuild in self.rebuilds:
                rebuild.fold(seq, event)
            self.events += 1
        self.through = seq

    def tables(self) -> list[tuple[str, tuple[str, ...], Rebuild]]:
        return [
            (table, keys, rebuild) for model, rebuild in self.rebuilds for table, keys in model.keys.items()
        ]


async def read_stream(
    bus: Bus,
    folding: Folding,
    until_seq: int,
    say: Say | None = None,
    every: float = 1.0,
    reader: LogReader | None = None,
) -> None:
    """Fold every event after ``folding.through`` up to ``until_seq`` (inclusive): through
    ``reader`` (the raw protocol, see ``logreader.py``) when there is one, else through a
    nats-py ordered consumer. Dead letters and re-driven copies are passed over, never folded."""
    if until_seq <= folding.through:
        return
    if reader is None:
        await _read_ordered(bus, folding, until_seq, say, every)
        return
    dlq = f"{bus.prefix}.dlq.".encode()
    first, start = folding.through, time.monotonic()
    next_say = start + every
    owns = folding.owns
    async with contextlib.aclosing(reader.read(folding.through, until_seq, stall=STALL)) as chunks:
        async for chunk in chunks:  # a failed fold still closes the read (its consumer)
            for seq, subject, headers, data in chunk:
                if (
                    subject.startswith(dlq)
                    or (REDRIVE in headers and REDRIVE in header_names(headers))
                    or (owns is not None and not owns(subject))
                ):
                    folding.through = seq
                else:
                    folding.fold(seq, data)
            if say is not None and (now := time.monotonic()) >= next_say:
                next_say = now + every
                say(_progress(folding, first, until_seq, now - start))
    # The reader stops early only when nothing exists between its last delivery and until_seq.
    folding.through = max(folding.through, until_seq)


def _progress(folding: Folding, first: int, until_seq: int, seconds: float) -> str:
    return (
        f"read {folding.through:,}/{until_seq:,} "
        f"({(folding.through - first) / seconds:,.0f} messages/s, {folding.events:,} events folded)"
    )


async def _read_ordered(bus: Bus, folding: Folding, until_seq: int, say: Say | None, every: float) -> None:
    """``read_stream`` through nats-py (a TLS server): messages are folded in the
    subscription's callback; a stream that delivers nothing for ``STALL`` seconds fails."""
    finished = asyncio.Event()
    failure: list[BaseException] = []
    prefix_dlq = f"{bus.prefix}.dlq."

    async def on_msg(msg: Msg) -> None:
        if finished.is_set():
            return
        try:
            seq = msg.metadata.sequence.stream
            if seq > folding.through:
                if msg.subject.startswith(prefix_dlq) or is_redrive(msg.headers):
                    folding.through = seq
                else:
                    folding.fold(seq, msg.data)
        except Exception as exc:
            failure.append(exc)
            finished.set()
            return
        if folding.through >= until_seq:
            finished.set()

    sub = await bus.js.subscribe(
        bus.events_subject(),
        stream=bus.stream,
        cb=on_msg,
        ordered_consumer=True,
        pending_msgs_limit=200_000,
        pending_bytes_limit=512 * 1024 * 1024,
        config=api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=folding.through + 1
        ),
    )
    start = time.monotonic()
    first = seen = folding.through
    stalled_since = start
    try:
        while not finished.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(finished.wait(), every)
            now = time.monotonic()
            if folding.through != seen:
                seen, stalled_since = folding.through, now
            elif now - stalled_since > STALL:
                raise RuntimeError(f"the stream stopped delivering at seq {folding.through} of {until_seq}")
            if say is not None and not finished.is_set():
                say(_progress(folding, first, until_seq, now - start))
        if failure:
            raise failure[0]
    finally:
        try:
            await sub.unsubscribe()
        except Exception:
            log.debug("unsubscribing the replay's consumer failed", exc_info=True)


def partition(prefix: str, part: int, parts: int) -> Callable[[bytes], bool]:
    """Whether a subject is in partition ``part`` of ``parts``: by a stable hash of its task
    token (``<prefix>.task.<task>.<event>``, ``<prefix>.history.<source>.<token>.<event>``,
    the task id spelled as ``subject_token`` spells it); every other subject is in part 0."""
    task, history = f"{prefix}.task.".encode(), f"{prefix}.history.".encode()

    def owns(subject: bytes) -> bool:
        if subject.startswith(task):
            token = subject_token(subject[len(task) : subject.rindex(b".")].decode()).encode()
        elif subject.startswith(history):
            token = subject[len(history) :].split(b".")[1]
        else:
            return part == 0
        return zlib.crc32(token) % parts == part

    return owns


def _fold_partition(
    settings: Settings, names: list[str], part: int, parts: int, until_seq: int
) -> tuple[list[Rebuild], int, int]:
    """In a worker process: fold partition ``part`` of the log through ``until_seq``; its
    rebuilds (pickled back to the replay), events folded and skipped."""
    return asyncio.run(_fold_partition_async(settings, names, part, parts, until_seq))


async def _fold_partition_async(
    settings: Settings, names: list[str], part: int, parts: int, until_seq: int
) -> tuple[list[Rebuild], int, int]:
    bus = await Bus.connect(settings, f"replay-{part}", ensure=False, reconnect=False)
    try:
        reader = await LogReader.open(bus, settings)
        if reader is None:
            raise RuntimeError("a replay worker needs the raw reader")
        folding = Folding([READ_MODELS[n] for n in names])
        folding.owns = partition(bus.prefix, part, parts)
        try:
            with no_gc():
                await read_stream(bus, folding, until_seq, reader=reader)
        finally:
            await reader.close()
        return [rebuild for _, rebuild in folding.rebuilds], folding.events, folding.skipped
    finally:
        await bus.close()


async def read_partitioned(
    settings: Settings,
    bus: Bus,
    folding: Folding,
    until_seq: int,
    reader: LogReader,
    workers: int,
    say: Say | None = None,
) -> None:
    """``read_stream`` in ``workers`` partitions (``partition``): this process folds part 0
    while worker processes fold the others, then their rebuilds are merged into ``folding``.
    Every process reads the whole log (cheap); each decodes and folds only its part."""
    names = [model.name for model in folding.models]
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(workers - 1, mp_context=multiprocessing.get_context("spawn")) as pool:
        others = [
            loop.run_in_executor(pool, _fold_partition, settings, names, part, workers, until_seq)
            for part in range(1, workers)
        ]
        folding.owns = partition(bus.prefix, 0, workers)
        with no_gc():  # also while the workers' rebuilds are unpickled: twice as fast
            try:
                await read_stream(bus, folding, until_seq, say, reader=reader)
            finally:
                folding.owns = None
            for rebuilds, events, skipped in await asyncio.gather(*others):
                for (_, mine), theirs in zip(folding.rebuilds, rebuilds, strict=True):
                    mine.merge(theirs)
                folding.events += events
                folding.skipped += skipped


def idle_cpus() -> int:
    """1 plus the CPUs the load average leaves idle, at most ``MAX_WORKERS``. More processes
    than idle CPUs only add the cost of sharing out (every process reads the whole log,
    the rebuilds are pickled back): measured on a busy machine, 60 % more CPU and no gain."""
    idle = (os.cpu_count() or 1) - os.getloadavg()[0]
    return max(1, min(MAX_WORKERS, 1 + int(idle)))


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """No cyclic garbage collection while folding or loading: the rows are long-lived and
    acyclic, and each collection would re-scan all of them."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
