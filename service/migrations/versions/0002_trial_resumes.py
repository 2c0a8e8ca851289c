"""Trials record the epoch they last resumed from.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("dst_trials", sa.Column("resumed_from_epoch", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column("dst_trials", "resumed_from_epoch")
