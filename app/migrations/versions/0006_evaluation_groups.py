"""evaluations queued together: one per adapter of one base model

``POST /evaluations`` with ``model.adapters`` queues one evaluation per adapter; they share a
``group_id`` (``GET /evaluations?group=``), and a worker keeps the base loaded across them.
Evaluations queued before have none.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("evaluations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("group_id", sa.String(length=40), nullable=True))
        batch_op.create_index("ix_evaluations_group", ["group_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("evaluations", schema=None) as batch_op:
        batch_op.drop_index("ix_evaluations_group")
        batch_op.drop_column("group_id")
