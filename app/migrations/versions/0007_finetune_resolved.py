"""a fine-tune job's settings as resolved at submission

The preset with the request's overrides (``hyperparameters``) and the optimizer steps the
dataset as inspected plans (``planned_steps``) are worked out once, when the job is queued,
and stored: the API shows them and the worker trains with them, even if a preset changes
while the job waits. Jobs queued before have none and are resolved as they were.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("finetune_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("resolved", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("finetune_jobs", schema=None) as batch_op:
        batch_op.drop_column("resolved")
