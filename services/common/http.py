"""The HTTP engine of every outbound call on the hot path: httpx's API over aiohttp's transport.

httpx's own engine (httpcore, pure Python) cost about 3 ms of CPU per request on our 2-core
machine; the same httpx client over aiohttp's C-accelerated transport (``httpx-aiohttp``)
about 0.7 ms (docs/BENCHMARKS.md). Callers keep httpx's API, timeouts and event hooks.

Invariant: every failure of the transport surfaces as an ``httpx.TransportError`` (or a
subclass), so callers' retry rules, which classify httpx's exceptions, hold unchanged:
errors ``httpx-aiohttp`` does not map itself are mapped here.
"""

from __future__ import annotations

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport


class Transport(AiohttpTransport):
    """``AiohttpTransport`` whose every aiohttp error is an httpx transport error."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await super().handle_async_request(request)
        except aiohttp.ClientError as exc:
            raise httpx.TransportError(f"{type(exc).__name__}: {exc}", request=request) from exc


def transport(max_connections: int = 100) -> Transport:
    return Transport(limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=20))
