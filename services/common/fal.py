"""Async client for fal.ai's queue: submit, status, result, cancel (shared/fal-protocol.md §1–§4, §6).

Invariants:
- Submit POSTs to `{base_url}/{model_id}`; status, result and cancel only ever use the absolute URLs
  that submit returned (fal's rule: never build them, since they drop the model's subpath).
- Transient failures are retried inside each call (tenacity, exponential backoff with jitter, at
  most `max_attempts` tries): HTTP 408/409/429/5xx (for `result`, only some 5xx: see below) and
  transport errors. Never retried: a 504 with `X-Fal-Request-Timeout-Type: user` (the caller's own
  deadline), a response marked `X-Fal-Retryable: false`, and every other 4xx.
- `result` has its own rule for 5xx: one that is the request's own answer (an `x-fal-request-id`
  header, or a JSON body with `detail` or `error_type`) is the model's final error (§3) and is never
  retried. A 5xx without those signs (an ingress page such as nginx's, or no body) stays transient;
  fal's own client likewise retries only ingress-like 502/503/504 (§6).
- Every failure surfaces as `FalError` carrying fal's own message and error type. `retryable` tells
  the caller whether trying the same call again later may help (it is True only for the transient
  kinds above).
- The API key is sent only in the `Authorization: Key …` header. It never appears in an exception
  message, a repr or a log line: messages taken from fal's answers are scrubbed of it.
- The key goes only to fal's host: status, result and cancel URLs (which come from fal's answers)
  are followed only when their scheme, host and port are those of `base_url`; anything else is a
  non-retryable `FalError` and no request is sent. Redirects are never followed.
- `submit` is not idempotent at fal: when a submit's answer is lost in transit, its retry can create
  a second request at fal (fal has no idempotency key); the first is then orphaned.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self

import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from services.common.http import transport as http_transport
from services.common.metrics import fal_error, fal_request

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://queue.fal.run"

QueueStatusName = Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
_QUEUE_STATUSES: tuple[QueueStatusName, ...] = ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
_CANCEL_STATUSES = frozenset({"OK", "CANCELLATION_REQUESTED", "ALREADY_COMPLETED", "NOT_FOUND"})
_RETRY_STATUS_CODES = frozenset({408, 409, 429})
_NOT_RETRIED_TRANSPORT_ERRORS = (httpx.UnsupportedProtocol, httpx.LocalProtocolError)
_MAX_TEXT_MESSAGE = 500
_REDACTED = "[redacted]"


class FalError(Exception):
    """A call to fal failed.

    `message` is fal's own (validation entries joined as `"<field>: <msg>"`), `status_code` is None
    for transport failures, `error_type` is fal's machine-readable type when it gave one, and
    `retryable` says whether the same call may succeed later. `retry_after` is fal's `Retry-After`
    in seconds, when it sent one.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        error_type: str | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.error_type = error_type
        self.retryable = retryable
        self.retry_after = retry_after

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return (
            f"FalError(status_code={self.status_code!r}, error_type={self.error_type!r}, "
            f"retryable={self.retryable!r}, message={self.message!r})"
        )


@dataclass(frozen=True)
class QueueHandle:
    """What fal answered to a submit: the request id and the URLs to follow it with."""

    request_id: str
    status_url: str
    response_url: str
    cancel_url: str
    queue_position: int | None


@dataclass(frozen=True)
class QueueStatus:
    """One status report. `error`/`error_type` are set when fal ended the request itself (runner
    failure, cancellation, timeout); a model's own error is only visible in the result."""

    status: QueueStatusName
    queue_position: int | None
    error: str | None
    error_type: str | None
    inference_time: float | None


def _is_transient(response: httpx.Response) -> bool:
    code = response.status_code
    if code == 504 and response.headers.get("x-fal-request-timeout-type", "").strip().lower() == "user":
        return False
    if response.headers.get("x-fal-retryable", "").strip().lower() == "false":
        return False
    return code in _RETRY_STATUS_CODES or code >= 500


def _is_request_answer(response: httpx.Response) -> bool:
    """fal answered for the request itself: its request id header, or its JSON error shape (§3)."""
    if "x-fal-request-id" in response.headers:
        return True
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and ("detail" in body or "error_type" in body)


def _is_transient_result(response: httpx.Response) -> bool:
    if response.status_code >= 500 and _is_request_answer(response):
        return False
    return _is_transient(response)


def _is_success(response: httpx.Response) -> bool:
    return response.is_success


def _is_cancel_answer(response: httpx.Response) -> bool:
    """fal answers cancel with `{"status": …}` under 202, 400 (ALREADY_COMPLETED) or 404 (⚠ §4)."""
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("status") in _CANCEL_STATUSES


def _should_retry(exc: BaseException) -> bool:
    if isinstance(exc, FalError):
        return exc.retryable
    return isinstance(exc, httpx.TransportError) and not isinstance(exc, _NOT_RETRIED_TRANSPORT_ERRORS)


def _join_detail(entries: list[Any]) -> str:
    """`"<loc without 'body'>: <msg>"` per entry, joined by `"; "`."""
    parts: list[str] = []
    for entry in entries:
        if not isinstance(entry, dict):
            parts.append(str(entry))
            continue
        loc = [str(p) for p in entry.get("loc") or []]
        if loc and loc[0] == "body":
            loc = loc[1:]
        msg = str(entry.get("msg") or entry.get("type") or "invalid input")
        parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    return "; ".join(parts)


def describe_error_body(body: Any) -> tuple[str | None, str | None]:
    """(message, error type) from one of fal's error bodies (§3), as found in a result or in a
    webhook's `payload`; (None, None) when it has neither."""
    if not isinstance(body, dict):
        return None, None
    detail = body.get("detail")
    message: str | None = None
    error_type = body.get("error_type") if isinstance(body.get("error_type"), str) else None
    if isinstance(detail, list) and detail:
        message = _join_detail(detail)
        first = detail[0]
        if error_type is None and isinstance(first, dict) and isinstance(first.get("type"), str):
            error_type = first["type"]
    elif isinstance(detail, str) and detail:
        message = detail
    return message, error_type


def _retry_after(response: httpx.Response) -> float | None:
    try:
        seconds = float(response.headers.get("retry-after", ""))
    except ValueError:
        return None
    return max(0.0, seconds)


def _origin(url: str | httpx.URL) -> tuple[str, str, int | None]:
    parsed = httpx.URL(url)
    return parsed.scheme, parsed.host.lower(), parsed.port


def _without_query(url: str | httpx.URL) -> str:
    return str(httpx.URL(url).copy_with(query=None))


class FalClient:
    """One connection pool to fal's queue, safe to share between concurrent tasks."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 30.0,
        max_attempts: int = 5,
        transport: httpx.AsyncBaseTransport | None = None,
        backoff_initial: float = 0.1,
        backoff_max: float = 10.0,
    ) -> None:
        if not api_key:
            raise ValueError("api_key must not be empty")
        if not api_key.isascii() or not api_key.isprintable() or any(c.isspace() for c in api_key):
            raise ValueError("api_key contains characters that are not allowed in an HTTP header")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self._base_url = base_url.rstrip("/")
        self._origin = _origin(self._base_url)
        parts = {api_key, *(part for part in api_key.split(":") if len(part) >= 8)}
        self._secrets = tuple(sorted(parts, key=len, reverse=True))
        self._max_attempts = max_attempts
        self._backoff = wait_exponential_jitter(
            multiplier=backoff_initial, max=backoff_max, jitter=backoff_initial
        )
        self._backoff_max = backoff_max
        self._http = httpx.AsyncClient(
            transport=transport or http_transport(),
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            headers={
                "Authorization": f"Key {api_key}",
                "Accept": "application/json",
                "User-Agent": "fluxpipe-fal/1",
            },
        )

    def __repr__(self) -> str:
        return f"FalClient(base_url={self._base_url!r})"

    def reconfigure(self, base_url: str, api_key: str) -> None:
        """Point later calls at another base URL and key (a configuration change); calls in
        flight finish with the old ones."""
        if not api_key or not api_key.isascii() or not api_key.isprintable() or " " in api_key:
            raise ValueError("api_key is empty or not allowed in an HTTP header")
        self._base_url = base_url.rstrip("/")
        self._origin = _origin(self._base_url)  # the key now goes only to the new host
        parts = {api_key, *(part for part in api_key.split(":") if len(part) >= 8)}
        self._secrets = tuple(sorted({*self._secrets, *parts}, key=len, reverse=True))
        self._http.headers["Authorization"] = f"Key {api_key}"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- the four queue operations -----------------------------------------------------------------

    async def submit(
        self, model_id: str, arguments: dict[str, Any], *, webhook_url: str | None = None
    ) -> QueueHandle:
        """Queue `arguments` for `model_id` (the full id, subpath included, e.g.
        `fal-ai/flux-pro/kontext/max`). With `webhook_url`, fal POSTs the outcome there (§5)."""
        endpoint = model_id.strip("/")
        if endpoint.count("/") < 1 or any(c in endpoint for c in "?#"):
            raise ValueError(f"not a fal model id: {model_id!r}")
        params = {"fal_webhook": webhook_url} if webhook_url is not None else None
        response = await self._send(
            "POST", f"{self._base_url}/{endpoint}", json_body=arguments, params=params, operation="submit"
        )
        body = self._json_object(response)
        fields = ("request_id", "status_url", "response_url", "cancel_url")
        if not all(isinstance(body.get(name), str) for name in fields):
            raise FalError(
                "fal's submit answer lacks the request id or URLs", status_code=response.status_code
            )
        position = body.get("queue_position")
        return QueueHandle(
            request_id=body["request_id"],
            status_url=body["status_url"],
            response_url=body["response_url"],
            cancel_url=body["cancel_url"],
            queue_position=position if isinstance(position, int) and not isinstance(position, bool) else None,
        )

    async def status(self, handle_or_status_url: QueueHandle | str) -> QueueStatus:
        """The request's current status (fal answers 202 while queued or running, 200 when done)."""
        url = (
            handle_or_status_url.status_url
            if isinstance(handle_or_status_url, QueueHandle)
            else handle_or_status_url
        )
        response = await self._send("GET", url, params={"logs": "0"}, operation="status")
        body = self._json_object(response)
        status = body.get("status")
        if status not in _QUEUE_STATUSES:
            raise FalError(f"fal reported an unknown status: {status!r}", status_code=response.status_code)
        position = body.get("queue_position")
        metrics = body.get("metrics")
        inference_time = metrics.get("inference_time") if isinstance(metrics, dict) else None
        error = body.get("error")
        error_type = body.get("error_type")
        return QueueStatus(
            status=status,
            queue_position=position if isinstance(position, int) and not isinstance(position, bool) else None,
            error=self._redact(error) if isinstance(error, str) else None,
            error_type=error_type if isinstance(error_type, str) else None,
            inference_time=(
                float(inference_time)
                if isinstance(inference_time, int | float) and not isinstance(inference_time, bool)
                else None
            ),
        )

    async def result(self, response_url: str) -> dict[str, Any]:
        """The model's output. A model error (422 validation, content policy, 5xx), a request that
        is not finished (400) or unknown (404) raises `FalError` with fal's message. A model's 5xx is
        final (not retried, not `retryable`); only an ingress-like 5xx is retried."""
        return self._json_object(
            await self._send("GET", response_url, transient=_is_transient_result, operation="result")
        )

    async def cancel(self, cancel_url: str) -> str:
        """Ask fal to cancel; returns fal's answer: `CANCELLATION_REQUESTED`, `ALREADY_COMPLETED`,
        `NOT_FOUND` or `OK`. Anything else (auth, transient failures that persist) raises."""
        response = await self._send("PUT", cancel_url, accept=_is_cancel_answer, operation="cancel")
        return str(response.json()["status"])

    # -- plumbing ----------------------------------------------------------------------------------

    async def _send(
        self,
        method: str,
        url: str,
        *,
        json_body: Any = None,
        params: dict[str, str] | None = None,
        accept: Callable[[httpx.Response], bool] = _is_success,
        transient: Callable[[httpx.Response], bool] = _is_transient,
        operation: str = "request",
    ) -> httpx.Response:
        """The first response that is not `transient` and that `accept` takes, retrying transient
        failures; otherwise `FalError`. Never sends anything (the key) off fal's host."""
        try:
            on_fal = _origin(url) == self._origin
        except httpx.InvalidURL:
            on_fal = False
        if not on_fal:
            raise FalError(
                f"refusing to send the fal key to {url.split('?')[0][:200]!r}: not on {self._base_url}",
                error_type="foreign_host",
            )
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._max_attempts),
            wait=self._wait,
            retry=retry_if_exception(_should_retry),
            before_sleep=lambda state: self._log_retry(state, f"{method} {_without_query(url)}"),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    request = self._http.build_request(method, url, json=json_body, params=params)
                    try:
                        with fal_request(operation):
                            response = await self._http.send(request)
                    except httpx.HTTPError:
                        fal_error(operation, None)
                        raise
                    retryable = transient(response)
                    if not retryable and accept(response):
                        return response
                    fal_error(operation, response.status_code)
                    raise self._error_from(response, retryable=retryable)
        except httpx.HTTPError as exc:
            message = self._redact(f"{type(exc).__name__} on {method} {_without_query(url)}: {exc}")
            raise FalError(message, retryable=_should_retry(exc)) from exc
        raise AssertionError("unreachable: tenacity either returns or re-raises")

    def _wait(self, state: RetryCallState) -> float:
        backoff = self._backoff(state)
        failure = state.outcome.exception() if state.outcome is not None else None
        if isinstance(failure, FalError) and failure.retry_after is not None:
            return min(max(failure.retry_after, backoff), self._backoff_max)
        return backoff

    def _log_retry(self, state: RetryCallState, target: str) -> None:
        failure = state.outcome.exception() if state.outcome is not None else None
        if isinstance(failure, FalError):
            reason = f"HTTP {failure.status_code}" + (f" {failure.error_type}" if failure.error_type else "")
        else:
            reason = type(failure).__name__
        sleep = state.next_action.sleep if state.next_action is not None else 0.0
        logger.warning(
            "fal call %s failed (%s); attempt %d of %d, retrying in %.2fs",
            target,
            reason,
            state.attempt_number,
            self._max_attempts,
            sleep,
        )

    def _error_from(self, response: httpx.Response, *, retryable: bool) -> FalError:
        """fal's message and error type from a failed response (§3 error shapes)."""
        try:
            body: Any = response.json()
        except ValueError:
            body = None
        message: str | None = None
        error_type: str | None = None
        detail_type: str | None = None
        if isinstance(body, dict):
            detail = body.get("detail")
            if isinstance(detail, list) and detail:
                message = _join_detail(detail)
                first = detail[0]
                if isinstance(first, dict) and isinstance(first.get("type"), str):
                    detail_type = first["type"]
            elif isinstance(detail, str) and detail:
                message = detail
            elif detail is not None:
                message = json.dumps(detail)
            if isinstance(body.get("error_type"), str):
                error_type = body["error_type"]
        if message is None:
            text = response.text.strip()
            if text.startswith("<") or "html" in response.headers.get("content-type", ""):
                # an ingress/proxy page, not fal's answer: its markup is no message for a user
                message = f"HTTP {response.status_code} {response.reason_phrase} from fal's gateway"
            else:
                message = text[:_MAX_TEXT_MESSAGE] if text else f"HTTP {response.status_code}"
        error_type = error_type or response.headers.get("x-fal-error-type") or detail_type
        return FalError(
            self._redact(message),
            status_code=response.status_code,
            error_type=error_type,
            retryable=retryable,
            retry_after=_retry_after(response),
        )

    def _json_object(self, response: httpx.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            # a garbled answer to a call that succeeded: the same call may well work next time
            raise FalError(
                "fal answered with something that is not a JSON object",
                status_code=response.status_code,
                retryable=True,
            )
        return body

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, _REDACTED)
        return text
