"""Prometheus metrics of every fluxpipe process (prometheus-client, one registry per process).

Every service is its own process, so the default registry holds exactly that service's
figures. The gateway serves them at ``GET /metrics``; each worker (projector, submitter,
poller, uploader) serves them on a small HTTP listener at ``FLUXPIPE_METRICS_PORT`` plus the
worker's offset (``METRICS_OFFSETS``), when that setting is not 0.

Invariants:
- Recording a figure never fails the work it describes: a metrics listener that cannot bind
  is logged and skipped, and gauges read from NATS are refreshed in the background.
- No label carries a secret, a prompt or a user id: labels are consumer names, operations,
  HTTP status codes and backend names, so the number of series stays small.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from services.common.settings import Settings

log = logging.getLogger(__name__)

METRICS_OFFSETS = {"projector": 1, "submitter": 2, "poller": 3, "uploader": 4, "ledger": 5}

EVENTS_HANDLED = Counter(
    "fluxpipe_events_handled_total", "Messages a consumer's handler finished (then acked)", ["consumer"]
)
EVENTS_FAILED = Counter(
    "fluxpipe_events_failed_total",
    "Messages a consumer's handler failed on; outcome is retry (nak'd with backoff) or dead_letter",
    ["consumer", "outcome"],
)
IN_FLIGHT = Gauge(
    "fluxpipe_handlers_in_flight",
    "Messages being handled right now by this process (for the submitter and poller: tasks at fal)",
    ["consumer"],
)
CONSUMER_PENDING = Gauge(
    "fluxpipe_consumer_pending", "Messages of the durable consumer not delivered yet (its lag)", ["consumer"]
)
CONSUMER_ACK_PENDING = Gauge(
    "fluxpipe_consumer_ack_pending", "Messages delivered and not acked yet, across replicas", ["consumer"]
)
CONSUMER_REDELIVERED = Gauge(
    "fluxpipe_consumer_redelivered", "Messages delivered more than once and not acked yet", ["consumer"]
)
FAL_LATENCY = Histogram(
    "fluxpipe_fal_request_seconds",
    "Latency of one HTTP request to fal's queue (each retry attempt counts once)",
    ["operation"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
FAL_ERRORS = Counter(
    "fluxpipe_fal_errors_total",
    "fal answers that were errors, by HTTP status code ('transport' when no answer came)",
    ["operation", "status"],
)
STORAGE_BYTES = Counter("fluxpipe_storage_bytes_total", "Bytes written to object storage", ["backend"])
STORAGE_OBJECTS = Counter("fluxpipe_storage_objects_total", "Objects written to object storage", ["backend"])
STORAGE_FAILURES = Counter("fluxpipe_storage_failures_total", "Failed writes to object storage", ["backend"])
PROJECTOR_APPLIED = Counter("fluxpipe_projector_events_applied_total", "Events folded into the read models")
PROJECTOR_DEAD_LETTERS = Counter(
    "fluxpipe_projector_dead_letters_total", "Events the projector could not apply and parked"
)
PROJECTOR_LAG_EVENTS = Gauge(
    "fluxpipe_projector_lag_events", "Stream messages after the projector's checkpoint (its lag in events)"
)
PROJECTOR_LAG_SECONDS = Gauge(
    "fluxpipe_projector_lag_seconds",
    "Age of the oldest event the projector has not applied yet; 0 when it is caught up",
)
PROJECTOR_CHECKPOINT = Gauge("fluxpipe_projector_checkpoint", "Last stream sequence applied")
HTTP_REQUESTS = Counter(
    "fluxpipe_http_requests_total",
    "Gateway requests answered, by route and status",
    ["method", "route", "status"],
)


@contextlib.contextmanager
def fal_request(operation: str) -> Iterator[None]:
    """Time one request to fal under ``operation`` (submit, status, result, cancel)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        FAL_LATENCY.labels(operation).observe(time.perf_counter() - start)


def fal_error(operation: str, status: int | None) -> None:
    FAL_ERRORS.labels(operation, str(status) if status is not None else "transport").inc()


def projector_position(applied_seq: int, last_seq: int, oldest_unapplied: datetime | None = None) -> None:
    """Record where the projector stands: ``applied_seq`` of the stream's ``last_seq``; the
    oldest message not applied yet was stored at ``oldest_unapplied`` (None: unknown, the
    seconds gauge is left as it is unless caught up)."""
    PROJECTOR_CHECKPOINT.set(applied_seq)
    behind = max(last_seq - applied_seq, 0)
    PROJECTOR_LAG_EVENTS.set(behind)
    if not behind:
        PROJECTOR_LAG_SECONDS.set(0)
    elif oldest_unapplied is not None:
        PROJECTOR_LAG_SECONDS.set(max((datetime.now(UTC) - oldest_unapplied).total_seconds(), 0.0))


def metrics_port(settings: Settings, service: str) -> int | None:
    """The port ``service`` serves ``/metrics`` on, or None when metrics listeners are off."""
    if not settings.metrics_port:
        return None
    return settings.metrics_port + METRICS_OFFSETS.get(service, 0)


@contextlib.asynccontextmanager
async def serving_metrics(settings: Settings, service: str) -> AsyncIterator[int | None]:
    """Serve this process's metrics over HTTP while the block runs; yields the port (or None)."""
    port = metrics_port(settings, service)
    if port is None:
        yield None
        return
    try:
        server, thread = start_http_server(port, addr=settings.metrics_host)
    except OSError as exc:
        log.warning("%s: cannot serve metrics on %s:%d: %s", service, settings.metrics_host, port, exc)
        yield None
        return
    log.info("%s: metrics on http://%s:%d/metrics", service, settings.metrics_host, port)
    try:
        yield port
    finally:
        server.shutdown()
        server.server_close()
        await asyncio.to_thread(thread.join, 5)
