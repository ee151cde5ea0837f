"""flux_tasks.failure_stage: where a failed task failed, for the monitoring figures

Revision ID: 0107
Revises: 0001
Create Date: 2026-11-28 23:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0107"
down_revision: str | None = "0106"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("flux_tasks", sa.Column("failure_stage", sa.String(length=20), nullable=True))


def downgrade() -> None:
    op.drop_column("flux_tasks", "failure_stage")
