"""Experiments record when their MLflow parent run was closed.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ENDED = ("succeeded", "failed", "cancelled")


def upgrade() -> None:
    op.add_column(
        "dst_experiments", sa.Column("mlflow_closed_at", sa.DateTime(timezone=True), nullable=True)
    )
    # experiments that ended before this column existed had their parent run closed then
    experiments = sa.table(
        "dst_experiments",
        sa.column("status", sa.String),
        sa.column("finished_at", sa.DateTime(timezone=True)),
        sa.column("mlflow_closed_at", sa.DateTime(timezone=True)),
    )
    op.execute(
        experiments.update()
        .where(experiments.c.status.in_(ENDED))
        .values(mlflow_closed_at=experiments.c.finished_at)
    )


def downgrade() -> None:
    op.drop_column("dst_experiments", "mlflow_closed_at")
