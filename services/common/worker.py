"""One way to run a worker: connect, build its resources, serve its consumer, close it all.

Each worker module (submitter, poller, uploader) declares only what is its own: the
``Consumer`` (durable name, subject, limits), the event type it handles, and a ``setup``
that opens its resources on an ``AsyncExitStack`` and returns the typed handler. Everything
else, connecting, the ack policy, stopping on a signal, closing in reverse order, is here.

Invariants:
- Resources are closed in reverse order of opening, after the consumer stopped (its in-flight
  handlers had their grace), and the NATS connection is drained last.
- A message whose event is not of ``event_type`` is a bug in the subject filter, never
  handled by a handler that cannot handle it: it is dead-lettered (``PermanentError``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from nats.aio.msg import Msg

from schemas.events import FluxEvent
from services.common.bus import Bus, PermanentError
from services.common.consumer import Consumer
from services.common.metrics import serving_metrics
from services.common.settings import Settings

E = TypeVar("E", bound=FluxEvent)

TypedHandler = Callable[[E, Msg], Awaitable[None]]
Setup = Callable[[Settings, Bus, contextlib.AsyncExitStack], Awaitable[tuple[Consumer, TypedHandler[E]]]]


@dataclass
class Worker(Generic[E]):
    """A worker service: what it consumes, and how it builds its handler."""

    name: str
    event_type: type[E]
    consumer: Setup[E]

    async def main(self, settings: Settings, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set (the service's entry point, ``fluxpipe run <name>``)."""
        async with contextlib.AsyncExitStack() as stack:
            bus = await Bus.connect(settings, self.name)
            stack.push_async_callback(bus.close)
            await stack.enter_async_context(serving_metrics(settings, self.name))
            spec, handler = await self.consumer(settings, bus, stack)
            event_type = self.event_type

            async def handle(event: FluxEvent, msg: Msg) -> None:
                if not isinstance(event, event_type):
                    raise PermanentError(
                        f"{self.name} handles {event_type.__name__}, got {type(event).__name__}"
                    )
                await handler(event, msg)

            await spec.serve(bus, handle, stop)
