"""flux_tasks.retry_of: the task a retry was made from

Revision ID: 0103
Revises: 0105
Create Date: 2026-11-28 23:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0103"
down_revision: str | None = "0105"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("flux_tasks", sa.Column("retry_of", sa.String(length=64), nullable=True))
    op.create_index("ix_flux_tasks_retry_of", "flux_tasks", ["retry_of"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_flux_tasks_retry_of", table_name="flux_tasks")
    op.drop_column("flux_tasks", "retry_of")
