"""How the simulator behaves: timings, where it keeps its queue, and the faults it injects.

`SimulatorSettings` is fixed at start. `Faults` is the part a test may change on a running
simulator (``PUT /_simulator/faults``, guarded by the simulator's key); at start it comes from
``FLUXPIPE_SIM_FAULTS`` (JSON). Every switch is off by default, so a plain simulator answers
like a healthy fal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

FaultKind = Literal["submit", "status", "result", "cancel"]
Probability = float


class Faults(BaseModel):
    """Fault switches. Rates are probabilities in [0, 1], rolled once per answer (or per request
    for `runner_error_rate`, per webhook for `webhook_failure_rate`); 1.0 makes a switch certain."""

    model_config = ConfigDict(extra="forbid")

    error_rates: dict[FaultKind, dict[int, Probability]] = Field(
        default_factory=dict,
        description="Per endpoint kind, the probability of answering each HTTP status instead "
        "(e.g. {'status': {'503': 0.2, '500': 0.1}}). 502/503/504 look like fal's nginx ingress.",
    )
    burst_429: int = Field(0, ge=0, description="The next N queue answers (any kind) are 429.")
    retry_after_seconds: int = Field(1, ge=0, description="Retry-After sent with an injected 429.")
    latency_seconds: dict[FaultKind, float] = Field(
        default_factory=dict, description="Added latency before answering, per endpoint kind."
    )
    hang: list[FaultKind] = Field(
        default_factory=list,
        description="Endpoint kinds whose answers never come: held until the client disconnects.",
    )
    malformed_json: dict[FaultKind, Probability] = Field(
        default_factory=dict, description="Probability that an answer's JSON body is cut in half."
    )
    runner_error_rate: Probability = Field(
        0.0, ge=0, le=1, description="Probability that a request ends with fal's runner_disconnected."
    )
    webhook_failure_rate: Probability = Field(
        0.0, ge=0, le=1, description="Probability that a request's webhook is never delivered."
    )

    @model_validator(mode="after")
    def _rates_are_probabilities(self) -> Faults:
        for kind, codes in self.error_rates.items():
            for code, rate in codes.items():
                if not 400 <= code <= 599:
                    raise ValueError(f"error_rates.{kind}: {code} is not an HTTP error status")
                if rate < 0:
                    raise ValueError(f"error_rates.{kind}.{code}: a rate cannot be negative")
            if sum(codes.values()) > 1:
                raise ValueError(f"error_rates.{kind}: the rates add up to more than 1")
        for kind, rate in self.malformed_json.items():
            if not 0 <= rate <= 1:
                raise ValueError(f"malformed_json.{kind}: a rate is between 0 and 1")
        for kind, seconds in self.latency_seconds.items():
            if seconds < 0:
                raise ValueError(f"latency_seconds.{kind}: latency cannot be negative")
        return self


class SimulatorSettings(BaseModel):
    """`public_url` is the absolute base URL clients reach it at: every URL it hands out
    (status/response/cancel URLs, image URLs) is built from it. With `data_dir`, the queue
    (requests, their arguments, state and outcomes, generated files) and the webhook signing key
    are kept there and survive a restart; without it they live in memory."""

    api_key: str = Field(repr=False)
    public_url: str
    queue_seconds: float = Field(default=0.5, ge=0)
    run_seconds: float = Field(default=1.0, ge=0)
    blocked_words: list[str] = Field(default_factory=lambda: ["forbidden"])
    stream_ping_seconds: float = Field(default=5.0, gt=0)
    data_dir: Path | None = None
    benchmark: bool = Field(
        default=False, description="Zero latency and pre-drawn images: for throughput benches."
    )
    faults: Faults = Field(default_factory=Faults)

    @property
    def effective_queue_seconds(self) -> float:
        return 0.0 if self.benchmark else self.queue_seconds

    @property
    def effective_run_seconds(self) -> float:
        return 0.0 if self.benchmark else self.run_seconds


class SimulatorEnvironment(BaseSettings):
    """The simulator's settings as ``fluxpipe run simulator`` reads them (``FLUXPIPE_SIM_*``)."""

    model_config = SettingsConfigDict(env_prefix="FLUXPIPE_SIM_", extra="ignore", case_sensitive=False)

    public_url: str | None = None
    queue_seconds: float = Field(default=0.5, ge=0)
    run_seconds: float = Field(default=1.5, ge=0)
    data_dir: Path | None = None
    benchmark: bool = False
    faults: Faults = Field(default_factory=Faults)

    def settings(self, api_key: str, default_public_url: str) -> SimulatorSettings:
        return SimulatorSettings(
            api_key=api_key,
            public_url=self.public_url or default_public_url,
            queue_seconds=self.queue_seconds,
            run_seconds=self.run_seconds,
            data_dir=self.data_dir,
            benchmark=self.benchmark,
            faults=self.faults,
        )
