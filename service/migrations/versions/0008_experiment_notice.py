"""Experiments carry a notice: what they wait for while they wait.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("dst_experiments", sa.Column("notice", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("dst_experiments", "notice")
