"""config: encrypted key as text, credit costs, who changed it; the credit ledger

Revision ID: 0105
Revises: 0001
Create Date: 2026-11-28 23:15:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0105"
down_revision: str | None = "0107"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.alter_column("flux_config", "api_key", type_=sa.Text(), existing_nullable=False)
    op.add_column(
        "flux_config",
        sa.Column(
            "credit_costs",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
    )
    op.add_column("flux_config", sa.Column("updated_by", sa.String(length=255), nullable=True))
    op.create_table(
        "flux_credit_ledger",
        sa.Column("stream_seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("amount", sa.Integer(), nullable=False),
        sa.Column("balance_after", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.String(length=64), nullable=True),
        sa.Column("model", sa.String(length=100), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("actor", sa.String(length=255), nullable=True),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("stream_seq", name=op.f("pk_flux_credit_ledger")),
    )
    op.create_index(
        "ix_flux_credit_ledger_user_id_stream_seq",
        "flux_credit_ledger",
        ["user_id", "stream_seq"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_flux_credit_ledger_user_id_stream_seq", table_name="flux_credit_ledger")
    op.drop_table("flux_credit_ledger")
    op.drop_column("flux_config", "updated_by")
    op.drop_column("flux_config", "credit_costs")
    op.alter_column("flux_config", "api_key", type_=sa.String(length=255), existing_nullable=False)
