"""initial read models

Revision ID: 0001
Revises:
Create Date: 2026-11-23 19:32:07.333161
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "flux_config",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("api_key", sa.String(length=255), nullable=False),
        sa.Column("base_url", sa.String(length=500), nullable=False),
        sa.Column("enabled", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("timeout", sa.Integer(), server_default=sa.text("300"), nullable=False),
        sa.Column("max_concurrent_tasks", sa.Integer(), server_default=sa.text("5"), nullable=False),
        sa.Column(
            "default_model",
            sa.String(length=100),
            server_default=sa.text("'fal-ai/flux-1/dev'"),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_flux_config")),
    )
    op.create_table(
        "flux_credits",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("credits_balance", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("total_used", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_flux_credits")),
    )
    op.create_index(op.f("ix_flux_credits_user_id"), "flux_credits", ["user_id"], unique=True)
    op.create_table(
        "flux_tasks",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("request_id", sa.String(length=100), nullable=True),
        sa.Column("model", sa.String(length=100), nullable=False),
        sa.Column("task_type", sa.String(length=20), nullable=False),
        sa.Column("status", sa.String(length=20), server_default="PENDING", nullable=False),
        sa.Column("prompt", sa.Text(), nullable=True),
        sa.Column("input_image_url", sa.Text(), nullable=True),
        sa.Column("input_image_urls", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("uploaded_image_url", sa.Text(), nullable=True),
        sa.Column("num_images", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column("aspect_ratio", sa.String(length=10), server_default="1:1", nullable=True),
        sa.Column("guidance_scale", sa.Float(), server_default=sa.text("3.5"), nullable=True),
        sa.Column("num_inference_steps", sa.Integer(), server_default=sa.text("28"), nullable=True),
        sa.Column("seed", sa.BigInteger(), nullable=True),
        sa.Column("safety_tolerance", sa.String(length=5), server_default="2", nullable=True),
        sa.Column("strength", sa.Float(), server_default=sa.text("0.95"), nullable=True),
        sa.Column("output_format", sa.String(length=10), server_default="jpeg", nullable=False),
        sa.Column("image_url", sa.Text(), nullable=True),
        sa.Column("cloud_image_url", sa.Text(), nullable=True),
        sa.Column("images", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("cloud_images", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("generation_time", sa.Float(), nullable=True),
        sa.Column("queue_position", sa.Integer(), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("storage_error", sa.Text(), nullable=True),
        sa.Column("retry_count", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("last_event_seq", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_flux_tasks")),
    )
    op.create_index(op.f("ix_flux_tasks_created_at"), "flux_tasks", ["created_at"], unique=False)
    op.create_index(op.f("ix_flux_tasks_request_id"), "flux_tasks", ["request_id"], unique=False)
    op.create_index(op.f("ix_flux_tasks_status"), "flux_tasks", ["status"], unique=False)
    op.create_index(op.f("ix_flux_tasks_user_id"), "flux_tasks", ["user_id"], unique=False)
    op.create_index("ix_flux_tasks_user_id_created_at", "flux_tasks", ["user_id", "created_at"], unique=False)
    op.create_table(
        "image_history",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("source", sa.String(length=20), nullable=False),
        sa.Column("source_task_id", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("model", sa.String(length=100), nullable=True),
        sa.Column("prompt", sa.Text(), nullable=True),
        sa.Column("image_url", sa.Text(), nullable=False),
        sa.Column("images", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_image_history")),
        sa.UniqueConstraint("source", "source_task_id", name=op.f("uq_image_history_source_source_task_id")),
    )
    op.create_index("ix_image_history_source", "image_history", ["source"], unique=False)
    op.create_index(
        "ix_image_history_user_id_created_at", "image_history", ["user_id", "created_at"], unique=False
    )
    op.create_table(
        "projector_checkpoints",
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("stream_seq", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_projector_checkpoints")),
    )


def downgrade() -> None:
    op.drop_table("projector_checkpoints")
    op.drop_index("ix_image_history_user_id_created_at", table_name="image_history")
    op.drop_index("ix_image_history_source", table_name="image_history")
    op.drop_table("image_history")
    op.drop_index("ix_flux_tasks_user_id_created_at", table_name="flux_tasks")
    op.drop_index(op.f("ix_flux_tasks_user_id"), table_name="flux_tasks")
    op.drop_index(op.f("ix_flux_tasks_status"), table_name="flux_tasks")
    op.drop_index(op.f("ix_flux_tasks_request_id"), table_name="flux_tasks")
    op.drop_index(op.f("ix_flux_tasks_created_at"), table_name="flux_tasks")
    op.drop_table("flux_tasks")
    op.drop_index(op.f("ix_flux_credits_user_id"), table_name="flux_credits")
    op.drop_table("flux_credits")
    op.drop_table("flux_config")
