"""Publishing other generators' history items (``HistoryItemRecorded``) from a batch tool.

Invariants:
- Re-running a tool over the same items changes nothing: an item whose last recorded event
  has the same data is not published again (checked on its own subject), and one published
  twice anyway (two runs at once) is dropped by the server's de-duplication on its msg id.
- Publishes are pipelined (``CONCURRENCY`` in flight), each awaiting its ack: when the tool
  says an item is recorded, it is in the log.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable

from nats.js.errors import NotFoundError

from schemas.events import HistoryItemRecorded, UnknownEvent, decode_event
from services.common.bus import Bus

CONCURRENCY = 64


async def unchanged(bus: Bus, event: HistoryItemRecorded) -> bool:
    """Whether the log's latest record of this item already says exactly this."""
    try:
        raw = await bus.js.get_last_msg(bus.stream, event.subject(bus.prefix))
    except NotFoundError:
        return False
    try:
        last = decode_event(raw.data or b"")
    except UnknownEvent:
        return False
    return isinstance(last, HistoryItemRecorded) and (last.user_id, last.data) == (event.user_id, event.data)


async def record_items(bus: Bus, events: Iterable[HistoryItemRecorded]) -> Counter[str]:
    """Publish every item not already recorded as it is; counts ``recorded`` / ``unchanged``."""
    counts: Counter[str] = Counter()
    slots = asyncio.Semaphore(CONCURRENCY)

    async def one(event: HistoryItemRecorded) -> None:
        async with slots:
            if await unchanged(bus, event):
                counts["unchanged"] += 1
                return
            ack = await bus.publish(event)
            counts["unchanged" if ack.duplicate else "recorded"] += 1

    await asyncio.gather(*(one(event) for event in events))
    return counts
