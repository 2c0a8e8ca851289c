"""Trials record the GPUs Ray gave them.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("dst_trials", sa.Column("gpus", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("dst_trials", "gpus")
