"""PostgreSQL read models (projections of the event log) and the async engine.

These tables are written only by the projector (``flux_config``, ``flux_credits`` and
``flux_credit_ledger`` too, from the configuration and credit events); Alembic migrations in
``migrations/`` are the only way their schema changes, and ``alembic check`` must find no
drift between this module and the database.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.common.settings import Settings

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def _created() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


def _updated() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


class FluxConfig(Base):
    """Provider configuration of the plan, projected from ``ConfigChanged`` (row id 1).

    ``api_key`` holds the fal key's Fernet ciphertext ('' when the ``FAL_KEY`` setting is used)."""

    __tablename__ = "flux_config"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    api_key: Mapped[str] = mapped_column(Text, nullable=False)
    base_url: Mapped[str] = mapped_column(String(500), nullable=False)
    enabled: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("true"))
    timeout: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("300"))
    max_concurrent_tasks: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("5"))
    default_model: Mapped[str] = mapped_column(
        String(100), nullable=False, server_default=text("'fal-ai/flux-1/dev'")
    )
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()
    credit_costs: Mapped[dict[str, int]] = mapped_column(
        JSONB, nullable=False, server_default=text("'{}'::jsonb")
    )
    updated_by: Mapped[str | None] = mapped_column(String(255))


class FluxTask(Base):
    """One row per task, folded from the task's events by the projector."""

    __tablename__ = "flux_tasks"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(255), nullable=False, index=True)
    request_id: Mapped[str | None] = mapped_column(String(100), index=True)
    model: Mapped[str] = mapped_column(String(100), nullable=False)
    task_type: Mapped[str] = mapped_column(String(20), nullable=False)
    status: Mapped[str] = mapped_column(String(20), nullable=False, index=True, server_default="PENDING")
    prompt: Mapped[str | None] = mapped_column(Text)
    input_image_url: Mapped[str | None] = mapped_column(Text)
    input_image_urls: Mapped[list[str] | None] = mapped_column(JSONB)
    uploaded_image_url: Mapped[str | None] = mapped_column(Text)
    num_images: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("1"))
    aspect_ratio: Mapped[str | None] = mapped_column(String(10), server_default="1:1")
    guidance_scale: Mapped[float | None] = mapped_column(Float, server_default=text("3.5"))
    num_inference_steps: Mapped[int | None] = mapped_column(Integer, server_default=text("28"))
    seed: Mapped[int | None] = mapped_column(BigInteger)
    safety_tolerance: Mapped[str | None] = mapped_column(String(5), server_default="2")
    strength: Mapped[float | None] = mapped_column(Float, server_default=text("0.95"))
    output_format: Mapped[str] = mapped_column(String(10), nullable=False, server_default="jpeg")
    image_url: Mapped[str | None] = mapped_column(Text)
    cloud_image_url: Mapped[str | None] = mapped_column(Text)
    images: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONB)
    cloud_images: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONB)
    generation_time: Mapped[float | None] = mapped_column(Float)
    queue_position: Mapped[int | None] = mapped_column(Integer)
    error_message: Mapped[str | None] = mapped_column(Text)
    storage_error: Mapped[str | None] = mapped_column(Text)
    retry_count: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    last_event_seq: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, index=True, server_default=func.now()
    )
    updated_at: Mapped[datetime] = _updated()
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    failure_stage: Mapped[str | None] = mapped_column(String(20))

    __table_args__ = (Index("ix_flux_tasks_user_id_created_at", "user_id", "created_at"),)


class FluxCredits(Base):
    __tablename__ = "flux_credits"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[str] = mapped_column(String(255), nullable=False, unique=True, index=True)
    credits_balance: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    total_used: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _updated()


class FluxCreditLedger(Base):
    """Every credit movement of every user, projected from ``<prefix>.credits.<user>``."""

    __tablename__ = "flux_credit_ledger"

    stream_seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    user_id: Mapped[str] = mapped_column(String(255), nullable=False)
    kind: Mapped[str] = mapped_column(String(20), nullable=False)
    amount: Mapped[int] = mapped_column(Integer, nullable=False)
    balance_after: Mapped[int] = mapped_column(Integer, nullable=False)
    task_id: Mapped[str | None] = mapped_column(String(64))
    model: Mapped[str | None] = mapped_column(String(100))
    reason: Mapped[str | None] = mapped_column(Text)
    actor: Mapped[str | None] = mapped_column(String(255))
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)

    __table_args__ = (Index("ix_flux_credit_ledger_user_id_stream_seq", "user_id", "stream_seq"),)


class ImageHistory(Base):
    """The unified history shared with the Midjourney and Jimeng generators.

    One row per finished task that has an image; each generator writes its own ``source``.
    ``image_url`` is ours before the provider's; a hidden row stays (its owner hid it).
    """

    __tablename__ = "image_history"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(String(20), nullable=False)
    source_task_id: Mapped[str] = mapped_column(String(64), nullable=False)
    user_id: Mapped[str] = mapped_column(String(255), nullable=False)
    model: Mapped[str | None] = mapped_column(String(100))
    prompt: Mapped[str | None] = mapped_column(Text)
    image_url: Mapped[str] = mapped_column(Text, nullable=False)
    images: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    tag: Mapped[str | None] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(20), nullable=False, server_default="SUCCESS")
    provider_image_url: Mapped[str | None] = mapped_column(Text)
    hidden: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("false"))
    last_event_seq: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))

    # Keyset paging reads (created_at, id) backwards from one of these, per user, visible rows only.
    __table_args__ = (
        UniqueConstraint("source", "source_task_id"),
        Index("ix_image_history_source", "source"),
        Index(
            "ix_image_history_user_id_created_at_id",
            "user_id",
            "created_at",
            "id",
            postgresql_where=text("NOT hidden"),
        ),
        Index(
            "ix_image_history_user_id_source_created_at_id",
            "user_id",
            "source",
            "created_at",
            "id",
            postgresql_where=text("NOT hidden"),
        ),
        Index(
            "ix_image_history_user_id_model_created_at_id",
            "user_id",
            "model",
            "created_at",
            "id",
            postgresql_where=text("NOT hidden"),
        ),
    )


class ProjectorCheckpoint(Base):
    """The last stream sequence a projection applied, written in the same transaction as its rows."""

    __tablename__ = "projector_checkpoints"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    stream_seq: Mapped[int] = mapped_column(BigInteger, nullable=False)
    updated_at: Mapped[datetime] = _updated()


def make_engine(settings: Settings, **kw: Any) -> AsyncEngine:
    return create_async_engine(settings.async_database_url, pool_pre_ping=True, **kw)
