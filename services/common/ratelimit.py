"""Per-user rate limits shared by every gateway process: fixed windows in a JetStream KV bucket.

Each (action, user, window) is one key of the bucket ``<stream>_ratelimits`` whose value is
the count so far; it is raised by compare-and-set on the key's revision, so concurrent gateway
processes never both take the last unit. A process remembers the count and revision it last
wrote per key, so a take is usually one round trip (the compare-and-set on that revision;
a stale one is refused and the key read again). Entries expire with the bucket's ``max_age`` (two
windows), so nothing has to be cleaned up. The bucket is in memory: a NATS restart forgives
the current window, which is the right trade for a limit against abuse; a limiter that finds
its bucket gone makes it again.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass, field
from typing import Literal

from nats.js import api
from nats.js.errors import (
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoStreamResponseError,
)
from nats.js.kv import KeyValue

from schemas.events import ledger_token
from services.common.bus import Bus
from services.common.settings import Settings

Action = Literal["jobs", "uploads"]


class RateLimited(Exception):
    def __init__(self, action: Action, limit: int, window: float, retry_after: int) -> None:
        noun = "jobs" if action == "jobs" else "uploads"
        per = f"{int(window)}" if window == int(window) else f"{window:g}"
        super().__init__(
            f"too many {noun}: at most {limit} per {per} seconds; retry in {retry_after} seconds"
        )
        self.retry_after = retry_after


@dataclass
class RateLimiter:
    kv: KeyValue
    settings: Settings

    bus: Bus
    # (count, revision) of each key of the current window as this process last wrote or read
    # it: the next take is then one compare-and-set, not a read and a compare-and-set. A stale
    # guess costs nothing but a retry: the write is refused unless the revision is current.
    _seen: dict[str, tuple[int, int]] = field(default_factory=dict)
    _seen_window: int = -1

    @classmethod
    async def open(cls, bus: Bus, settings: Settings) -> RateLimiter:
        return cls(await _bucket(bus, settings), settings, bus)

    def limit_of(self, action: Action) -> int:
        return self.settings.rate_limit_jobs if action == "jobs" else self.settings.rate_limit_uploads

    async def take(self, action: Action, user_id: str) -> None:
        """Count one ``action`` of the user in the current window; ``RateLimited`` if the window
        is used up (with the seconds until it ends)."""
        limit = self.limit_of(action)
        if limit <= 0:
            return
        window = self.settings.rate_limit_window
        now = time.time()
        index = int(now // window)
        if index != self._seen_window:
            self._seen.clear()
            self._seen_window = index
        key = f"{action}.{ledger_token(user_id)}.{index}"
        # None: not read yet. A key never seen by this process is first tried as new (one
        # write); known to exist, it is read first.
        known = self._seen.get(key)
        exists = known is not None
        confirmed = False  # the count was read from the bucket in this call
        for attempt in range(200):
            if known is None and exists:
                try:
                    entry = await self.kv.get(key)
                except KeyNotFoundError:
                    exists = False
                except NoStreamResponseError:  # the bucket is gone (a NATS restart): make it again
                    await self._reopen()
                    exists = False
                else:
                    known = (int(entry.value or b"0"), entry.revision or 0)
                    confirmed = True
            count, revision = known or (0, 0)
            if count >= limit:
                if not confirmed:  # a remembered count: read it (the bucket may have been lost since)
                    known = None
                    continue
                raise RateLimited(action, limit, window, max(1, math.ceil((index + 1) * window - now)))
            try:
                # last=0: create, refused if the key exists
                written = await self.kv.update(key, str(count + 1).encode(), last=revision)
            except KeyWrongLastSequenceError:
                known, exists = None, True
                if attempt:
                    await asyncio.sleep(random.uniform(0, min(0.002 * attempt, 0.05)))
                continue
            except NoStreamResponseError:
                await self._reopen()
                known, exists = None, False
                continue
            self._seen[key] = (count + 1, written)
            return
        raise RateLimited(action, limit, window, 1)

    async def _reopen(self) -> None:
        self._seen.clear()
        self.kv = await _bucket(self.bus, self.settings)


async def _bucket(bus: Bus, settings: Settings) -> KeyValue:
    name = f"{bus.stream}_ratelimits"
    try:
        return await bus.js.key_value(name)
    except BucketNotFoundError:
        return await bus.js.create_key_value(
            api.KeyValueConfig(
                bucket=name,
                history=1,
                ttl=2 * settings.rate_limit_window,
                storage=api.StorageType.MEMORY,
                replicas=settings.stream_replicas,
            )
        )
