"""The gateway's HTTP contract for configuration and credits (request and response models)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator

from schemas.catalog import MODELS, TEXT_TO_IMAGE_MODELS


class ConfigUpdate(BaseModel):
    """``PUT /api/flux/admin/config``: only the fields given change."""

    model_config = ConfigDict(extra="forbid")

    base_url: HttpUrl | None = None
    enabled: bool | None = None
    timeout: int | None = Field(None, ge=1, le=3600, description="seconds a task may spend at fal")
    max_concurrent_tasks: int | None = Field(None, ge=1, le=1000)
    default_model: str | None = None
    credit_costs: dict[str, int] | None = Field(
        None, description="model id -> credits per job; any cost above 0 turns credits on"
    )
    api_key: str | None = Field(None, min_length=8, max_length=200, description="the fal key (write only)")

    @field_validator("default_model")
    @classmethod
    def _text_to_image(cls, value: str | None) -> str | None:
        if value is not None and value not in TEXT_TO_IMAGE_MODELS:
            raise ValueError(f"must be a text-to-image model: {', '.join(TEXT_TO_IMAGE_MODELS)}")
        return value

    @field_validator("credit_costs")
    @classmethod
    def _known_models(cls, value: dict[str, int] | None) -> dict[str, int] | None:
        for model, cost in (value or {}).items():
            if model not in MODELS:
                raise ValueError(f"unknown model {model!r}")
            if not 0 <= cost <= 1_000_000:
                raise ValueError(f"the cost of {model} must be between 0 and 1000000")
        return value

    @field_validator("api_key")
    @classmethod
    def _header_safe(cls, value: str | None) -> str | None:
        if value is not None and (not value.isascii() or not value.isprintable() or " " in value):
            raise ValueError("must be printable ASCII without spaces")
        return value


class ConfigOut(BaseModel):
    base_url: str
    enabled: bool
    timeout: int
    max_concurrent_tasks: int
    default_model: str
    credit_costs: dict[str, int]
    api_key: str = Field(description="masked: only the last four characters")
    api_key_source: Literal["config", "environment"]
    updated_by: str | None = None
    updated_at: datetime | None = None


class CreditGrant(BaseModel):
    """``POST /api/flux/admin/credits/{user_id}``: a positive amount grants, a negative one takes back."""

    model_config = ConfigDict(extra="forbid")

    amount: int = Field(ge=-1_000_000_000, le=1_000_000_000)
    reason: str = Field(min_length=1, max_length=500)

    @field_validator("amount")
    @classmethod
    def _not_zero(cls, value: int) -> int:
        if value == 0:
            raise ValueError("must not be 0")
        return value


class LedgerEntry(BaseModel):
    kind: Literal["granted", "held", "charged", "refunded"]
    amount: int
    balance_after: int
    task_id: str | None = None
    model: str | None = None
    reason: str | None = None
    actor: str | None = None
    occurred_at: datetime


class CreditsOut(BaseModel):
    user_id: str
    balance: int = Field(description="credits spendable now (held credits are not)")
    held: int = Field(description="credits held by tasks not yet ended")
    total_used: int
    credits_enabled: bool
    costs: dict[str, int]
    ledger: list[LedgerEntry] = Field(description="this user's movements, newest first")
    ledger_total: int
    page: int
    limit: int
