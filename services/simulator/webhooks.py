"""fal's webhook delivery (§5): the body, the Ed25519 signature, and the retries.

The signing key lives in the simulator's store (one per data folder) and is published at
``/.well-known/jwks.json``. ⚠ fal retries 10 times over 2 h; the simulator tries `ATTEMPTS` times
with a short backoff. A delivery is attempted only once a request is COMPLETED, and the body is
built from the request's kept outcome, so a redelivery after a restart carries the same payload.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from services.simulator.outcomes import Outcome

logger = logging.getLogger(__name__)

USER_ID = "simulator"
ATTEMPTS = 3


def new_private_key() -> bytes:
    return Ed25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


class Signer:
    def __init__(self, private_key: bytes) -> None:
        self._key = Ed25519PrivateKey.from_private_bytes(private_key)

    def jwks(self) -> dict[str, Any]:
        raw = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        x = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
        return {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "simulator", "use": "sig"}]}

    def headers(self, request_id: str, raw: bytes) -> dict[str, str]:
        timestamp = str(int(time.time()))
        message = "\n".join([request_id, USER_ID, timestamp, hashlib.sha256(raw).hexdigest()])
        return {
            "Content-Type": "application/json",
            "X-Fal-Webhook-Request-Id": request_id,
            "X-Fal-Webhook-User-Id": USER_ID,
            "X-Fal-Webhook-Timestamp": timestamp,
            "X-Fal-Webhook-Signature": self._key.sign(message.encode()).hex(),
        }


def body(request_id: str, outcome: Outcome) -> bytes:
    payload: dict[str, Any] = {"request_id": request_id, "gateway_request_id": request_id}
    if outcome.ok:
        payload |= {"status": "OK", "payload": outcome.body}
    else:
        payload |= {
            "status": "ERROR",
            "error": f"Invalid status code: {outcome.status_code}",
            "payload": outcome.body,
        }
    return json.dumps(payload).encode()


async def deliver(
    http: httpx.AsyncClient, signer: Signer, url: str, request_id: str, outcome: Outcome
) -> bool:
    """POST the signed body until a 2xx answers; False if every attempt failed."""
    raw = body(request_id, outcome)
    try:
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(ATTEMPTS),
            wait=wait_exponential(multiplier=0.5, max=5),
            retry=retry_if_exception_type(httpx.HTTPError),
            reraise=True,
        ):
            with attempt:
                response = await http.post(url, content=raw, headers=signer.headers(request_id, raw))
                response.raise_for_status()
    except httpx.HTTPError as exc:
        logger.warning("webhook for request %s not delivered: %s", request_id, type(exc).__name__)
        return False
    return True
