"""stored responses are capped, and a worker that cannot start says why

A served model may answer megabytes where a few hundred characters were asked for; a worker
stores at most ``FORGETGUARD_MAX_STORED_RESPONSE_CHARS`` of it and marks the item
``truncated`` (rows stored before keep ``false``). A worker slot of ``forgetguard serve`` whose
starts fail is listed by ``GET /workers`` with the reason in ``workers.error``.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("evaluation_items", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("truncated", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("error", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.drop_column("error")
    with op.batch_alter_table("evaluation_items", schema=None) as batch_op:
        batch_op.drop_column("truncated")
