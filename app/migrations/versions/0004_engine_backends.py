"""engine backends: which engine runs a job, and what each worker and evaluation ran on

Evaluations and fine-tune jobs gain ``backend`` (claimed only by a worker of that backend);
evaluations gain ``endpoint`` (a served model's base URL) and ``engine`` (backend, device,
dtype and engine version, recorded by the worker); workers gain ``backend``, ``dtype`` and
``engine_version``, and room for several devices in ``device``.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("evaluations", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("backend", sa.String(16), nullable=False, server_default="transformers")
        )
        batch_op.add_column(sa.Column("endpoint", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("engine", sa.JSON(), nullable=True))
    with op.batch_alter_table("finetune_jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("backend", sa.String(16), nullable=False, server_default="transformers")
        )
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("backend", sa.String(16), nullable=False, server_default="transformers")
        )
        batch_op.add_column(sa.Column("dtype", sa.String(32), nullable=True))
        batch_op.add_column(sa.Column("engine_version", sa.String(100), nullable=True))
        batch_op.alter_column(
            "device", existing_type=sa.String(32), type_=sa.String(255), existing_nullable=False
        )


def downgrade() -> None:
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.alter_column(
            "device", existing_type=sa.String(255), type_=sa.String(32), existing_nullable=False
        )
        batch_op.drop_column("engine_version")
        batch_op.drop_column("dtype")
        batch_op.drop_column("backend")
    with op.batch_alter_table("finetune_jobs", schema=None) as batch_op:
        batch_op.drop_column("backend")
    with op.batch_alter_table("evaluations", schema=None) as batch_op:
        batch_op.drop_column("engine")
        batch_op.drop_column("endpoint")
        batch_op.drop_column("backend")
