"""``POST /api/flux/webhooks/fal/{task_id}``: fal's completion webhook (shared/fal-protocol.md §5).

The submitter gives fal this URL (``fal_webhook``) when ``FLUXPIPE_WEBHOOK_BASE_URL`` is set.
The route verifies the delivery (``services.common.fal_webhook``) and publishes
``WebhookReceived``; it never writes a table and never publishes the task's outcome itself.
The poller, which follows the task, wakes on that event and publishes the terminal event, so a
webhook and a poll racing each other still end the task once (``<task>.end``).

Answers: 200 accepted; 401 for a forged, stale or replayed delivery, or one signed for another
fal request than the task's; 404 for an unknown task; 413 for a body over 512 kB; 422 for a body
that is not fal's shape; 503 when fal's public keys cannot be fetched (fal retries).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, status

from schemas.events import TaskRequested, TaskSubmitted, WebhookReceived, WebhookReceivedData
from services.common.fal_webhook import InvalidWebhook, JwksUnavailable, WebhookVerifier
from services.gateway.deps import BusDep, SettingsDep

router = APIRouter(prefix="/api/flux/webhooks", tags=["webhooks"])

MAX_BODY_BYTES = 512_000  # the event that carries it must fit a NATS message (1 MB)


async def get_verifier(request: Request, settings: SettingsDep) -> WebhookVerifier:
    """One verifier (and JWKS cache) per gateway process."""
    verifier: WebhookVerifier | None = getattr(request.app.state, "fal_webhook_verifier", None)
    if verifier is None:
        verifier = WebhookVerifier(
            settings.fal_jwks_url,
            tolerance=settings.webhook_tolerance_seconds,
            cache_seconds=settings.jwks_cache_seconds,
        )
        request.app.state.fal_webhook_verifier = verifier
    return verifier


VerifierDep = Annotated[WebhookVerifier, Depends(get_verifier)]


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, message)


async def _read_body(request: Request) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise HTTPException(
                status.HTTP_413_REQUEST_ENTITY_TOO_LARGE, f"webhook body over {MAX_BODY_BYTES} bytes"
            )
    return bytes(body)


def _parse(body: bytes, request_id: str, delivery: str) -> WebhookReceivedData:
    try:
        doc: Any = json.loads(body)
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, "webhook body is not JSON") from exc
    if not isinstance(doc, dict) or doc.get("status") not in ("OK", "ERROR"):
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_ENTITY, "webhook body lacks fal's status (OK or ERROR)"
        )
    if doc.get("request_id") != request_id:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_ENTITY, "webhook body's request_id differs from its signed header"
        )
    payload = doc.get("payload")
    error, payload_error = doc.get("error"), doc.get("payload_error")
    return WebhookReceivedData(
        request_id=request_id,
        status=doc["status"],
        delivery=delivery,
        payload=payload if isinstance(payload, dict) else None,
        error=str(error) if error is not None else None,
        payload_error=str(payload_error) if payload_error is not None else None,
    )


WEBHOOK_BODY = {
    "type": "object",
    "required": ["request_id", "status"],
    "properties": {
        "request_id": {"type": "string"},
        "gateway_request_id": {"type": "string"},
        "status": {"type": "string", "enum": ["OK", "ERROR"]},
        "payload": {"type": ["object", "null"]},
        "error": {"type": "string"},
        "payload_error": {"type": "string"},
    },
}
WEBHOOK_HEADERS = [
    {"name": name, "in": "header", "required": True, "schema": {"type": "string"}}
    for name in (
        "X-Fal-Webhook-Request-Id",
        "X-Fal-Webhook-User-Id",
        "X-Fal-Webhook-Timestamp",
        "X-Fal-Webhook-Signature",
    )
]


@router.post(
    "/fal/{task_id}",
    openapi_extra={
        "parameters": WEBHOOK_HEADERS,
        "requestBody": {"required": True, "content": {"application/json": {"schema": WEBHOOK_BODY}}},
    },
)
async def fal_webhook(task_id: str, request: Request, bus: BusDep, verifier: VerifierDep) -> dict[str, str]:
    """Receive fal's signed completion webhook for one task (no bearer token: fal signs it)."""
    body = await _read_body(request)
    try:
        delivery = await verifier.verify(request.headers, body)
    except InvalidWebhook as exc:
        raise _unauthorized(str(exc)) from exc
    except JwksUnavailable as exc:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, f"{exc}; retry later", headers={"Retry-After": "5"}
        ) from exc
    data = _parse(body, delivery.request_id, delivery.delivery_id)
    requested = await bus.last_event(task_id, "requested") if task_id.isalnum() else None
    if not isinstance(requested, TaskRequested):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"task {task_id} not found")
    submitted = await bus.last_event(task_id, "submitted")
    if isinstance(submitted, TaskSubmitted) and submitted.data.request_id != delivery.request_id:
        raise _unauthorized(f"this delivery is for fal request {delivery.request_id}, not this task's")
    cause = submitted if isinstance(submitted, TaskSubmitted) else requested
    ack = await bus.publish(WebhookReceived.caused_by(cause, data))
    if ack.duplicate:
        raise _unauthorized("replayed webhook: this signed delivery was already received")
    return {"message": "accepted", "task_id": task_id}
