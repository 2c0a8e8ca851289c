"""A trial's node names every host its training processes run on: any length.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("dst_trials") as batch:  # SQLite rebuilds the table
        batch.alter_column(
            "node", type_=sa.Text(), existing_type=sa.String(255), existing_nullable=True
        )


def downgrade() -> None:
    # the hosts of a trial on many nodes are cut to what the narrower column holds
    op.execute("UPDATE dst_trials SET node = substr(node, 1, 255) WHERE length(node) > 255")
    with op.batch_alter_table("dst_trials") as batch:
        batch.alter_column(
            "node", type_=sa.String(255), existing_type=sa.Text(), existing_nullable=True
        )
