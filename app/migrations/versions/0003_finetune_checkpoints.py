"""fine-tune checkpoint evaluations

One row per evaluated optimizer step of a fine-tune job (general figures, domain figures,
drift and the verdict against the base), so a resumed worker does not evaluate a step twice
and ``GET /finetune-jobs/{id}/checkpoints`` can draw the forgetting and learning curves.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "finetune_checkpoints",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("general", sa.JSON(), nullable=True),
        sa.Column("domain", sa.JSON(), nullable=True),
        sa.Column("drift", sa.JSON(), nullable=True),
        sa.Column("verdict", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["finetune_jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("finetune_checkpoints", schema=None) as batch_op:
        batch_op.create_unique_constraint("uq_finetune_checkpoints_step", ["job_id", "step"])


def downgrade() -> None:
    op.drop_table("finetune_checkpoints")
