"""training processes: what a fine-tune job asks for and what a worker holds

A fine-tune job may train in several processes (``resources.processes``, a DDP group); a
worker says how many it can run (``forgetguard worker --processes N`` or ``--devices``), and
claims only jobs that fit. Every existing job and worker is one process.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("finetune_jobs", "workers"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(
                sa.Column("processes", sa.Integer(), nullable=False, server_default="1")
            )


def downgrade() -> None:
    for table in ("workers", "finetune_jobs"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("processes")
