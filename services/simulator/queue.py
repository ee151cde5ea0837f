"""The simulator's queue: requests, their phases, queue positions, logs and outcomes.

Invariants:
- A request's phase is a function of the wall clock: IN_QUEUE until `started_at`, IN_PROGRESS
  until `done_at`, then COMPLETED. Cancellation and a `X-Fal-Request-Timeout` only move its end
  earlier. Wall-clock times (not monotonic ones) are kept so that a restarted simulator carries
  on where it stopped: a request whose end passed while it was down is COMPLETED at once.
- No timer drives the state: the model's work (validation, downloads, drawing) starts the first
  time anyone observes the request running; only webhook delivery waits in the background.
- A termination (cancelled, start timeout, injected runner error) wins over a model run under
  way. The first outcome decided is kept and persisted; later answers repeat it.
- Every change to a request is written to the store before the answer that reveals it, so a
  restart never contradicts what a client was told.
- Requests are forgotten one hour after completion (fal's result retention).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, PrivateAttr

from services.simulator import outcomes, webhooks
from services.simulator.generation import generate
from services.simulator.outcomes import Outcome
from services.simulator.settings import SimulatorSettings
from services.simulator.store import Store

logger = logging.getLogger(__name__)

RETENTION_SECONDS = 3600.0
STREAM_TICK_SECONDS = 0.05

Phase = Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
Termination = Literal["cancelled", "timeout", "runner_disconnected"]


class Request(BaseModel):
    """One submitted request, as kept in the store."""

    model_config = ConfigDict(ser_json_inf_nan="constants")

    request_id: str
    model_id: str
    app_path: str
    arguments: dict[str, Any]
    base_url: str
    submitted_at: float
    started_at: float
    done_at: float
    webhook_url: str | None = None
    webhook_pending: bool = False
    termination: Termination | None = None
    outcome: Outcome | None = None

    _run: asyncio.Task[Outcome] | None = PrivateAttr(default=None)
    _ended: asyncio.Event = PrivateAttr(default_factory=asyncio.Event)

    @property
    def response_url(self) -> str:
        return f"{self.base_url}/{self.app_path}/requests/{self.request_id}"

    def urls(self) -> dict[str, str]:
        return {
            "response_url": self.response_url,
            "status_url": self.response_url + "/status",
            "cancel_url": self.response_url + "/cancel",
        }

    def phase(self, now: float) -> Phase:
        if now >= self.done_at:
            return "COMPLETED"
        if now >= self.started_at:
            return "IN_PROGRESS"
        return "IN_QUEUE"

    def ran(self) -> bool:
        return self.started_at < self.done_at

    @staticmethod
    def wall(moment: float) -> str:
        return datetime.fromtimestamp(moment, UTC).isoformat()


class Simulator:
    """The queue behind the routes. All methods run on the server's event loop."""

    def __init__(self, settings: SimulatorSettings) -> None:
        self.settings = settings
        self.faults = settings.faults
        self.base_url = settings.public_url.rstrip("/")
        self.store = Store(settings.data_dir)
        self.signer = webhooks.Signer(self.store.meta("webhook-signing-key", webhooks.new_private_key()))
        self.random = random.Random()
        self.requests: dict[str, Request] = {}
        self._queues: dict[str, deque[Request]] = {}
        for raw in self.store.records():
            req = Request.model_validate_json(raw)
            self.requests[req.request_id] = req
            self._queues.setdefault(req.app_path, deque()).append(req)
        self._http: httpx.AsyncClient | None = None
        self._background: set[asyncio.Task[Any]] = set()

    def start(self) -> None:
        """Resume what a previous run left: webhooks not yet delivered."""
        for req in self.requests.values():
            if req.webhook_pending:
                self._spawn(self._deliver_webhook(req))

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(follow_redirects=True, timeout=httpx.Timeout(10.0))
        return self._http

    async def close(self) -> None:
        tasks = list(self._background) + [r._run for r in self.requests.values() if r._run is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()
        self.store.close()

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _save(self, req: Request) -> None:
        self.store.save(req.request_id, req.done_at + RETENTION_SECONDS, req.model_dump_json())

    def roll(self, probability: float) -> bool:
        return probability > 0 and self.random.random() < probability

    # -- queue ------------------------------------------------------------------------------------

    def _expire(self, now: float) -> None:
        for request_id in self.store.expire(now):
            self.requests.pop(request_id, None)

    def submit(
        self,
        app_path: str,
        model_id: str,
        arguments: dict[str, Any],
        webhook_url: str | None,
        start_timeout: float | None,
    ) -> Request:
        now = time.time()
        self._expire(now)
        queue_seconds = self.settings.effective_queue_seconds
        started_at = now + queue_seconds
        done_at = started_at + self.settings.effective_run_seconds
        termination: Termination | None = None
        if start_timeout is not None and start_timeout < queue_seconds:
            started_at, done_at, termination = math.inf, now + start_timeout, "timeout"
        elif self.roll(self.faults.runner_error_rate):
            termination = "runner_disconnected"
        req = Request(
            request_id=str(uuid.uuid4()),
            model_id=model_id,
            app_path=app_path,
            arguments=arguments,
            base_url=self.base_url,
            submitted_at=now,
            started_at=started_at,
            done_at=done_at,
            webhook_url=webhook_url,
            webhook_pending=webhook_url is not None,
            termination=termination,
        )
        self.requests[req.request_id] = req
        queue = self._queues.setdefault(app_path, deque())
        self._prune(queue, now)
        queue.append(req)
        self._save(req)
        if webhook_url is not None:
            self._spawn(self._deliver_webhook(req))
        return req

    def lookup(self, app_path: str, request_id: str) -> Request | None:
        """The request, only if addressed through its own `[namespace/]owner/alias` (§1 URL rule)."""
        req = self.requests.get(request_id)
        return req if req is not None and req.app_path == app_path else None

    @staticmethod
    def _prune(queue: deque[Request], now: float) -> None:
        while queue and queue[0].phase(now) != "IN_QUEUE":
            queue.popleft()

    def queue_position(self, req: Request, now: float) -> int:
        """0-indexed position among the app's requests still IN_QUEUE, in submission order."""
        queue = self._queues.get(req.app_path, deque())
        self._prune(queue, now)
        position = 0
        for other in queue:
            if other is req:
                break
            if other.phase(now) == "IN_QUEUE":
                position += 1
        return position

    def cancel(self, req: Request) -> bool:
        """End a request that is not COMPLETED yet; False if it already was."""
        now = time.time()
        if req.phase(now) == "COMPLETED":
            return False
        req.done_at, req.termination = now, "cancelled"
        self._save(req)
        req._ended.set()
        return True

    # -- status -----------------------------------------------------------------------------------

    def logs(self, req: Request, now: float) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = []

        def add(moment: float, message: str) -> None:
            entries.append(
                {"message": message, "level": "INFO", "source": "user", "timestamp": req.wall(moment)}
            )

        if req.ran() and now >= req.started_at:
            add(req.started_at, f"Running {req.model_id}")
        if req.phase(now) == "COMPLETED":
            if req.termination == "cancelled":
                add(req.done_at, "Request cancelled")
            elif req.termination is None:
                add(req.done_at, f"Finished in {self.settings.effective_run_seconds:.2f}s")
        return entries

    def status_body(self, req: Request, now: float, logs: list[dict[str, Any]] | None) -> dict[str, Any]:
        """The status JSON of §2 for `req` at `now`; `logs` is None when logs were not asked for."""
        phase = req.phase(now)
        body: dict[str, Any] = {"status": phase, "request_id": req.request_id, **req.urls()}
        if phase == "IN_QUEUE":
            body["queue_position"] = self.queue_position(req, now)
            return body
        body["logs"] = logs
        body["metrics"] = {}
        if phase == "COMPLETED":
            if req.termination is None:
                body["metrics"] = {"inference_time": float(self.settings.effective_run_seconds)}
            else:
                outcome = outcomes.TERMINATIONS[req.termination]()
                body["error"], body["error_type"] = outcome.error, outcome.error_type
        return body

    def observe(self, req: Request, now: float) -> Phase:
        """The phase at `now`; once a request has started, its model run is started too."""
        phase = req.phase(now)
        if phase != "IN_QUEUE" and req.termination is None and req.outcome is None and req._run is None:
            req._run = asyncio.get_running_loop().create_task(self._run_model(req))
        return phase

    async def stream(self, req: Request, with_logs: bool) -> AsyncIterator[str]:
        """SSE events: one `data:` per change of status, position or logs; `: ping` while idle;
        the stream ends right after the COMPLETED event. Logs are sent incrementally (⚠ §2)."""
        last_key: tuple[Any, ...] | None = None
        sent_logs = 0
        last_write = time.monotonic()
        while True:
            now = time.time()
            phase = self.observe(req, now)
            logs = self.logs(req, now) if with_logs else []
            position = self.queue_position(req, now) if phase == "IN_QUEUE" else None
            key = (phase, position, len(logs))
            if key != last_key:
                body = self.status_body(req, now, logs[sent_logs:] if with_logs else None)
                yield f"data: {json.dumps(body)}\n\n"
                last_key, sent_logs, last_write = key, len(logs), time.monotonic()
                if phase == "COMPLETED":
                    return
            elif time.monotonic() - last_write >= self.settings.stream_ping_seconds:
                yield ": ping\n\n"
                last_write = time.monotonic()
            await asyncio.sleep(STREAM_TICK_SECONDS)

    # -- results ----------------------------------------------------------------------------------

    async def outcome(self, req: Request) -> Outcome:
        """The result of a COMPLETED request."""
        if req.termination is not None:
            return outcomes.TERMINATIONS[req.termination]()
        if req.outcome is not None:
            return req.outcome
        self.observe(req, time.time())
        assert req._run is not None
        result = await asyncio.shield(req._run)
        if req.termination is not None:
            return outcomes.TERMINATIONS[req.termination]()
        return result

    async def _run_model(self, req: Request) -> Outcome:
        try:
            outcome, files = await generate(
                model_id=req.model_id,
                arguments=req.arguments,
                http=self.http,
                blocked_words=self.settings.blocked_words,
                benchmark=self.settings.benchmark,
                inference_seconds=float(self.settings.effective_run_seconds),
                file_url=lambda name: f"{self.base_url}/files/{req.request_id}/{name}",
            )
        except Exception:
            logger.exception("simulated model run failed for request %s", req.request_id)
            outcome, files = outcomes.internal_error(req.arguments), {}
        if files:
            self.store.put_files(req.request_id, files)
        if req.termination is None:
            req.outcome = outcome
            self._save(req)
        return outcome

    # -- webhooks ---------------------------------------------------------------------------------

    async def _deliver_webhook(self, req: Request) -> None:
        """Once the request is COMPLETED, POST its outcome to `fal_webhook` (unless the
        webhook-failure fault drops it); the request then no longer owes a delivery."""
        assert req.webhook_url is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(req._ended.wait(), timeout=max(0.0, req.done_at - time.time()))
        outcome = await self.outcome(req)
        if self.roll(self.faults.webhook_failure_rate):
            logger.info("webhook for request %s dropped (webhook_failure_rate)", req.request_id)
        else:
            await webhooks.deliver(self.http, self.signer, req.webhook_url, req.request_id, outcome)
        req.webhook_pending = False
        self._save(req)
