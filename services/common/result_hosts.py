"""Where the uploader may download results from: fal's result hosts only.

A ``TaskCompleted`` carries image URLs that came from fal's answer (or a webhook). Fetching any
URL found there would let whoever controls that answer make us fetch internal addresses, so
the uploader's HTTP client checks every request it sends, each redirect hop included, against:

- the hosts of ``FLUXPIPE_FAL_RESULT_HOSTS`` (comma-separated; ``*.fal.media`` matches any
  subdomain, ``host:port`` pins a port), over https only;
- fal's own queue host (``FAL_BASE_URL``), with its scheme and port (the simulator in dev).

Anything else raises ``ForeignResultHost`` before a byte is sent.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from services.common.http import transport as http_transport
from services.common.settings import Settings


class ForeignResultHost(Exception):
    """A result URL (or a redirect) points outside fal's result hosts."""


@dataclass(frozen=True)
class ResultHosts:
    patterns: tuple[str, ...]
    base: tuple[str, str, int | None]

    @classmethod
    def from_settings(cls, settings: Settings) -> ResultHosts:
        patterns = tuple(p.strip().lower() for p in settings.fal_result_hosts.split(",") if p.strip())
        base = httpx.URL(settings.fal_base_url)
        return cls(patterns, (base.scheme, base.host.lower(), base.port))

    def allows(self, url: httpx.URL) -> bool:
        host = url.host.lower()
        if (url.scheme, host, url.port) == self.base:
            return True
        if url.scheme != "https":
            return False
        for pattern in self.patterns:
            name, _, port = pattern.partition(":")
            if port and str(url.port or 443) != port:
                continue
            if name.startswith("*.") and host.endswith(name[1:]) or host == name:
                return True
        return False

    async def check(self, request: httpx.Request) -> None:
        """httpx request hook: runs for the first request and for every redirect hop."""
        if not self.allows(request.url):
            raise ForeignResultHost(
                f"refusing to download {request.url.copy_with(query=None)}: not one of fal's result hosts"
            )


def result_client(settings: Settings, **kwargs: object) -> httpx.AsyncClient:
    """An HTTP client that only ever talks to fal's result hosts, redirects included."""
    hosts = ResultHosts.from_settings(settings)
    kwargs.setdefault("transport", http_transport())
    return httpx.AsyncClient(event_hooks={"request": [hosts.check]}, **kwargs)  # type: ignore[arg-type]
