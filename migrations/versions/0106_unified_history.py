"""unified history: tag, status, provider URL, hiding, keyset indexes

Revision ID: 0106
Revises: 0001
Create Date: 2026-11-28 23:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0106"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

VISIBLE = sa.text("NOT hidden")


def upgrade() -> None:
    op.add_column("image_history", sa.Column("tag", sa.String(length=100), nullable=True))
    op.add_column(
        "image_history", sa.Column("status", sa.String(length=20), server_default="SUCCESS", nullable=False)
    )
    op.add_column("image_history", sa.Column("provider_image_url", sa.Text(), nullable=True))
    op.add_column(
        "image_history", sa.Column("hidden", sa.Boolean(), server_default=sa.text("false"), nullable=False)
    )
    op.add_column(
        "image_history",
        sa.Column("last_event_seq", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
    )
    op.drop_index("ix_image_history_user_id_created_at", table_name="image_history")
    op.create_index(
        "ix_image_history_user_id_created_at_id",
        "image_history",
        ["user_id", "created_at", "id"],
        postgresql_where=VISIBLE,
    )
    op.create_index(
        "ix_image_history_user_id_source_created_at_id",
        "image_history",
        ["user_id", "source", "created_at", "id"],
        postgresql_where=VISIBLE,
    )
    op.create_index(
        "ix_image_history_user_id_model_created_at_id",
        "image_history",
        ["user_id", "model", "created_at", "id"],
        postgresql_where=VISIBLE,
    )


def downgrade() -> None:
    op.drop_index("ix_image_history_user_id_model_created_at_id", table_name="image_history")
    op.drop_index("ix_image_history_user_id_source_created_at_id", table_name="image_history")
    op.drop_index("ix_image_history_user_id_created_at_id", table_name="image_history")
    op.create_index(
        "ix_image_history_user_id_created_at", "image_history", ["user_id", "created_at"], unique=False
    )
    op.drop_column("image_history", "last_event_seq")
    op.drop_column("image_history", "hidden")
    op.drop_column("image_history", "provider_image_url")
    op.drop_column("image_history", "status")
    op.drop_column("image_history", "tag")
