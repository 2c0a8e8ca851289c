"""Trials record the host (Ray node) they last reported from.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("dst_trials", sa.Column("node", sa.String(255), nullable=True))


def downgrade() -> None:
    op.drop_column("dst_trials", "node")
