"""Verifying fal's webhook deliveries (shared/fal-protocol.md §5), exactly as fal documents it.

1. The four headers ``X-Fal-Webhook-Request-Id``, ``-User-Id``, ``-Timestamp`` (unix seconds)
   and ``-Signature`` (hex) must all be there.
2. ``|now - timestamp|`` must be at most ``tolerance`` seconds (300 by default).
3. The signed message is ``request_id \\n user_id \\n timestamp \\n hex(sha256(raw body))``.
4. The delivery is valid if any Ed25519 key of fal's JWKS (``kty`` OKP, ``crv`` Ed25519, ``x``
   base64url) verifies the detached signature.

Invariants:
- The JWKS is cached for ``cache_seconds`` (at most 24 h, as fal asks). A signature that no
  cached key verifies triggers one refetch (fal rotated its keys; its headers name no key id),
  at most once per ``refetch_interval`` so forged deliveries cannot make us hammer the JWKS.
- A JWKS that cannot be fetched is ``JwksUnavailable`` (the caller answers 503 and fal retries),
  never a verdict on the delivery.
- Replays are not this module's job: ``delivery_id`` names one signed delivery, and the caller
  publishes it as part of a ``Nats-Msg-Id`` so the server drops a second copy; that requires
  ``tolerance`` to be shorter than the stream's duplicate window, which the constructor checks.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from services.common.bus import DUPLICATE_WINDOW_SECONDS

HEADERS = (
    "x-fal-webhook-request-id",
    "x-fal-webhook-user-id",
    "x-fal-webhook-timestamp",
    "x-fal-webhook-signature",
)


class InvalidWebhook(Exception):
    """The delivery is not a genuine, fresh fal webhook; the message says why."""


class JwksUnavailable(Exception):
    """fal's public keys could not be fetched, so nothing can be verified right now."""


@dataclass(frozen=True)
class Delivery:
    request_id: str
    user_id: str
    timestamp: int
    delivery_id: str


def delivery_id(signature_hex: str) -> str:
    """A short stable name for one signed delivery."""
    return hashlib.sha256(signature_hex.strip().lower().encode()).hexdigest()[:32]


def _public_keys(jwks: object) -> list[Ed25519PublicKey]:
    keys: list[Ed25519PublicKey] = []
    entries = jwks.get("keys") if isinstance(jwks, dict) else None
    for entry in entries if isinstance(entries, list) else ():
        if not isinstance(entry, dict) or entry.get("kty") != "OKP" or entry.get("crv") != "Ed25519":
            continue
        x = entry.get("x")
        if not isinstance(x, str):
            continue
        try:
            raw = base64.urlsafe_b64decode(x + "=" * (-len(x) % 4))
            keys.append(Ed25519PublicKey.from_public_bytes(raw))
        except (ValueError, binascii.Error):
            continue
    return keys


class WebhookVerifier:
    """Verifies deliveries against fal's JWKS; one instance per process, safe to share."""

    def __init__(
        self,
        jwks_url: str,
        *,
        tolerance: float = 300.0,
        cache_seconds: float = 3600.0,
        refetch_interval: float = 10.0,
        clock: Callable[[], float] = time.time,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if tolerance >= DUPLICATE_WINDOW_SECONDS:
            raise ValueError(
                f"webhook tolerance {tolerance:g}s must be shorter than the duplicate window "
                f"({DUPLICATE_WINDOW_SECONDS}s), or a replay could slip past de-duplication"
            )
        self.jwks_url = jwks_url
        self.tolerance = tolerance
        self.cache_seconds = min(cache_seconds, 86400.0)
        self.refetch_interval = refetch_interval
        self.clock = clock
        self.fetches = 0
        self._transport = transport
        self._keys: list[Ed25519PublicKey] = []
        self._fetched_at: float | None = None
        self._lock = asyncio.Lock()

    async def verify(self, headers: Mapping[str, str], body: bytes) -> Delivery:
        """The delivery's signed facts, or ``InvalidWebhook`` saying what is wrong with it."""
        values = {name: headers.get(name) for name in HEADERS}
        missing = [name for name, value in values.items() if not value]
        if missing:
            raise InvalidWebhook(f"missing webhook header(s): {', '.join(missing)}")
        request_id, user_id, ts_text, signature_hex = (str(values[name]) for name in HEADERS)
        try:
            timestamp = int(ts_text)
        except ValueError as exc:
            raise InvalidWebhook("X-Fal-Webhook-Timestamp is not a unix time in seconds") from exc
        skew = abs(self.clock() - timestamp)
        if skew > self.tolerance:
            raise InvalidWebhook(
                f"stale webhook: its timestamp is {skew:.0f}s away from now (tolerance {self.tolerance:g}s)"
            )
        try:
            signature = bytes.fromhex(signature_hex)
        except ValueError as exc:
            raise InvalidWebhook("X-Fal-Webhook-Signature is not hex") from exc
        message = "\n".join([request_id, user_id, ts_text, hashlib.sha256(body).hexdigest()]).encode()
        if not self._any_verifies(await self._current_keys(), signature, message):
            refreshed = await self._refetch_if_allowed()
            if refreshed is None or not self._any_verifies(refreshed, signature, message):
                raise InvalidWebhook("the webhook signature does not verify with fal's public keys")
        return Delivery(request_id, user_id, timestamp, delivery_id(signature_hex))

    @staticmethod
    def _any_verifies(keys: list[Ed25519PublicKey], signature: bytes, message: bytes) -> bool:
        for key in keys:
            try:
                key.verify(signature, message)
            except InvalidSignature:
                continue
            return True
        return False

    async def _current_keys(self) -> list[Ed25519PublicKey]:
        async with self._lock:
            now = time.monotonic()
            if self._fetched_at is None or now - self._fetched_at > self.cache_seconds:
                await self._fetch()
            return self._keys

    async def _refetch_if_allowed(self) -> list[Ed25519PublicKey] | None:
        """Fresh keys, or None if we fetched them too recently to ask again."""
        async with self._lock:
            if self._fetched_at is not None and time.monotonic() - self._fetched_at < self.refetch_interval:
                return None
            await self._fetch()
            return self._keys

    async def _fetch(self) -> None:
        try:
            async with httpx.AsyncClient(transport=self._transport, timeout=5.0) as http:
                response = await http.get(self.jwks_url, headers={"Accept": "application/json"})
                response.raise_for_status()
                keys = _public_keys(response.json())
        except (httpx.HTTPError, ValueError) as exc:
            raise JwksUnavailable(f"fal's JWKS could not be fetched: {type(exc).__name__}") from exc
        if not keys:
            raise JwksUnavailable("fal's JWKS holds no Ed25519 key")
        self.fetches += 1
        self._keys, self._fetched_at = keys, time.monotonic()
