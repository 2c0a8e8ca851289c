"""Per-epoch metrics of each trial.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "dst_trial_epochs",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "experiment_id",
            sa.String(32),
            sa.ForeignKey("dst_experiments.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("trial_index", sa.Integer(), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("metrics_json", sa.Text(), nullable=False),
        sa.UniqueConstraint("experiment_id", "trial_index", "epoch"),
    )
    op.create_index("ix_dst_trial_epochs_experiment_id", "dst_trial_epochs", ["experiment_id"])


def downgrade() -> None:
    op.drop_index("ix_dst_trial_epochs_experiment_id", "dst_trial_epochs")
    op.drop_table("dst_trial_epochs")
