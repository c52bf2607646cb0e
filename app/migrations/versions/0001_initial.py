"""initial schema

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "claims",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_kind", sa.String(length=16), nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("worker_id", sa.String(length=64), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("claimed_at", sa.DateTime(), nullable=False),
        sa.Column("lease_expires_at", sa.DateTime(), nullable=False),
        sa.Column("released_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("claims", schema=None) as batch_op:
        batch_op.create_index("ix_claims_job", ["job_kind", "job_id"], unique=False)

    op.create_table(
        "evaluations",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("model_path", sa.Text(), nullable=False),
        sa.Column("adapter_path", sa.Text(), nullable=True),
        sa.Column("model_fingerprint", sa.String(length=80), nullable=True),
        sa.Column("prompt_format", sa.String(length=16), nullable=True),
        sa.Column("generation", sa.JSON(), nullable=False),
        sa.Column("suites", sa.JSON(), nullable=False),
        sa.Column("results", sa.JSON(), nullable=True),
        sa.Column("cache_key", sa.String(length=80), nullable=True),
        sa.Column("use_cache", sa.Boolean(), nullable=False),
        sa.Column("cached_from", sa.String(length=40), nullable=True),
        sa.Column("finetune_job_id", sa.String(length=40), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("progress", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("label", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("worker_id", sa.String(length=64), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=True),
        sa.Column("not_before", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("evaluations", schema=None) as batch_op:
        batch_op.create_index("ix_evaluations_cache_key", ["cache_key", "status"], unique=False)
        batch_op.create_index("ix_evaluations_claim", ["status", "created_at"], unique=False)
        batch_op.create_index("ix_evaluations_created", ["created_at", "id"], unique=False)
        batch_op.create_index("ix_evaluations_model_path", ["model_path"], unique=False)

    op.create_table(
        "finetune_jobs",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("base_model_path", sa.Text(), nullable=False),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("before_evaluation_id", sa.String(length=40), nullable=True),
        sa.Column("after_evaluation_id", sa.String(length=40), nullable=True),
        sa.Column("output_path", sa.Text(), nullable=True),
        sa.Column("checkpoint_path", sa.Text(), nullable=True),
        sa.Column("comparison", sa.JSON(), nullable=True),
        sa.Column("warnings", sa.JSON(), nullable=False),
        sa.Column("trainable_parameters", sa.JSON(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("progress", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("label", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("worker_id", sa.String(length=64), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=True),
        sa.Column("not_before", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("finetune_jobs", schema=None) as batch_op:
        batch_op.create_index("ix_finetune_jobs_claim", ["status", "created_at"], unique=False)
        batch_op.create_index("ix_finetune_jobs_created", ["created_at", "id"], unique=False)

    op.create_table(
        "idempotency_keys",
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("path", sa.String(length=255), nullable=False),
        sa.Column("body_hash", sa.String(length=80), nullable=False),
        sa.Column("resource_id", sa.String(length=40), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("key", "path"),
    )
    op.create_table(
        "suites",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("content_hash", sa.String(length=80), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("item_count", sa.Integer(), nullable=False),
        sa.Column("definition", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name", "version", name="uq_suites_name_version"),
    )
    with op.batch_alter_table("suites", schema=None) as batch_op:
        batch_op.create_index("ix_suites_name_hash", ["name", "content_hash"], unique=False)

    op.create_table(
        "workers",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("device", sa.String(length=32), nullable=False),
        sa.Column("kinds", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("current_job_id", sa.String(length=40), nullable=True),
        sa.Column("current_job_kind", sa.String(length=16), nullable=True),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "evaluation_items",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("evaluation_id", sa.String(length=40), nullable=False),
        sa.Column("suite", sa.String(length=100), nullable=False),
        sa.Column("item_id", sa.String(length=200), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("response", sa.Text(), nullable=True),
        sa.Column("passed", sa.Boolean(), nullable=True),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("category", sa.String(length=100), nullable=True),
        sa.Column("severity", sa.String(length=16), nullable=True),
        sa.Column("details", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["evaluation_id"], ["evaluations.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("evaluation_id", "suite", "item_id", name="uq_evaluation_items_item"),
    )
    with op.batch_alter_table("evaluation_items", schema=None) as batch_op:
        batch_op.create_index(
            "ix_evaluation_items_eval_pos", ["evaluation_id", "suite", "position"], unique=False
        )

    op.create_table(
        "finetune_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("level", sa.String(length=16), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["finetune_jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("finetune_events", schema=None) as batch_op:
        batch_op.create_index("ix_finetune_events_job", ["job_id", "id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("finetune_events", schema=None) as batch_op:
        batch_op.drop_index("ix_finetune_events_job")

    op.drop_table("finetune_events")
    with op.batch_alter_table("evaluation_items", schema=None) as batch_op:
        batch_op.drop_index("ix_evaluation_items_eval_pos")

    op.drop_table("evaluation_items")
    op.drop_table("workers")
    with op.batch_alter_table("suites", schema=None) as batch_op:
        batch_op.drop_index("ix_suites_name_hash")

    op.drop_table("suites")
    op.drop_table("idempotency_keys")
    with op.batch_alter_table("finetune_jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_finetune_jobs_created")
        batch_op.drop_index("ix_finetune_jobs_claim")

    op.drop_table("finetune_jobs")
    with op.batch_alter_table("evaluations", schema=None) as batch_op:
        batch_op.drop_index("ix_evaluations_model_path")
        batch_op.drop_index("ix_evaluations_created")
        batch_op.drop_index("ix_evaluations_claim")
        batch_op.drop_index("ix_evaluations_cache_key")

    op.drop_table("evaluations")
    with op.batch_alter_table("claims", schema=None) as batch_op:
        batch_op.drop_index("ix_claims_job")

    op.drop_table("claims")
