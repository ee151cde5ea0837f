"""What a COMPLETED request answers: the result endpoint's status, body and headers, which a
webhook carries too, and the `error`/`error_type` its final status reports (§2, §3).

An outcome is decided once per request and then kept (on disk when the simulator has a data
folder), so every later status, result and webhook for the request tells the same story.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from services.simulator.catalog import fal_error

CONTENT_POLICY_MESSAGE = (
    "The content could not be processed because it contained material flagged by a content checker."
)


class Outcome(BaseModel):
    status_code: int
    body: Any
    headers: dict[str, str] = Field(default_factory=dict)
    error: str | None = None
    error_type: str | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status_code < 300


def cancelled() -> Outcome:
    # ⚠ fal documents neither the status nor the result of a cancelled request. The simulator ends it
    # at once: status COMPLETED with `error`/`error_type` (the shape fal uses for runner failures,
    # and the only one fal's clients accept, since they know just three statuses), and a 400 result.
    message = "Request was cancelled"
    body = {"detail": message, "error_type": "request_cancelled"}
    headers = {"X-Fal-Error-Type": "request_cancelled"}
    return Outcome(status_code=400, body=body, headers=headers, error=message, error_type="request_cancelled")


def timed_out() -> Outcome:
    message = "Request timed out"
    body = {"detail": message, "error_type": "request_timeout"}
    headers = {"X-Fal-Error-Type": "request_timeout", "X-Fal-Request-Timeout-Type": "user"}
    return Outcome(status_code=504, body=body, headers=headers, error=message, error_type="request_timeout")


def runner_disconnected() -> Outcome:
    """The runner fault (§3 infra errors): status COMPLETED with the error, result a 503."""
    message = "Runner disconnected"
    body = {"detail": message, "error_type": "runner_disconnected"}
    headers = {"X-Fal-Error-Type": "runner_disconnected"}
    return Outcome(
        status_code=503, body=body, headers=headers, error=message, error_type="runner_disconnected"
    )


def unprocessable(entries: list[dict]) -> Outcome:
    return Outcome(status_code=422, body={"detail": entries}, headers={"X-Fal-Retryable": "false"})


def internal_error(arguments: dict[str, Any]) -> Outcome:
    entry = fal_error((), "Internal server error", "internal_server_error", arguments)
    return Outcome(status_code=500, body={"detail": [entry]}, headers={"X-Fal-Retryable": "true"})


TERMINATIONS = {
    "cancelled": cancelled,
    "timeout": timed_out,
    "runner_disconnected": runner_disconnected,
}
