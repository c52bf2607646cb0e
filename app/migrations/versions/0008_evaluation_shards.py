"""sharded evaluations: one evaluation split into shard jobs that several workers claim

``POST /evaluations`` with ``"shards": N`` queues the evaluation (``shard_count`` N, never
claimed itself) and N shard jobs (``shard_of`` it, ``shard_index`` 0..N-1), each scoring one
slice of the items into the parent's item rows. Evaluations queued before are not sharded.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("evaluations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("shard_of", sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column("shard_index", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("shard_count", sa.Integer(), nullable=True))
        batch_op.create_index("ix_evaluations_shard_of", ["shard_of"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("evaluations", schema=None) as batch_op:
        batch_op.drop_index("ix_evaluations_shard_of")
        batch_op.drop_column("shard_count")
        batch_op.drop_column("shard_index")
        batch_op.drop_column("shard_of")
