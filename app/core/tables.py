"""SQLAlchemy models. The schema itself is made only by the Alembic migrations (app/migrations)."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from forgetguard.status import JobStatus

# The largest value an ``Integer`` column holds in both databases: PostgreSQL's INTEGER is
# 32-bit (SQLite's is 64-bit). Every integer a client sends that is compared with such a column
# (item and event cursors, suite versions) is bounded by this, so PostgreSQL never has to
# cast an out-of-range parameter (a DataError, hence a 500) and both databases answer alike.
SQL_INT_MAX = 2**31 - 1


def utcnow() -> datetime:
    """Naive UTC now: stored the same way on SQLite and PostgreSQL."""
    return datetime.now(UTC).replace(tzinfo=None)


def new_id(prefix: str) -> str:
    """An opaque, URL-safe, time-ordered-enough id such as ``ev_0f3a9c…``."""
    return f"{prefix}_{secrets.token_hex(8)}"


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class JobMixin:
    """Lifecycle and lease fields shared by every queued job kind."""

    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED)
    progress: Mapped[dict[str, Any]] = mapped_column(
        JSON, default=lambda: {"done": 0, "total": 0, "stage": "queued"}
    )
    error: Mapped[str | None] = mapped_column(Text, default=None)
    label: Mapped[str | None] = mapped_column(String(200), default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, default=None)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    worker_id: Mapped[str | None] = mapped_column(String(64), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime, default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime, default=None)
    # Backoff: a job released after a failure is not claimed again before this time.
    not_before: Mapped[datetime | None] = mapped_column(DateTime, default=None)


class Suite(Base):
    """One immutable version of a suite; same name + same content hash = same version."""

    __tablename__ = "suites"
    __table_args__ = (
        UniqueConstraint("name", "version", name="uq_suites_name_version"),
        Index("ix_suites_name_hash", "name", "content_hash"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100))
    version: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(32))
    content_hash: Mapped[str] = mapped_column(String(80))
    description: Mapped[str | None] = mapped_column(Text, default=None)
    source: Mapped[str] = mapped_column(String(16), default="uploaded")
    item_count: Mapped[int] = mapped_column(Integer)
    definition: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Evaluation(JobMixin, Base):
    __tablename__ = "evaluations"
    __table_args__ = (
        Index("ix_evaluations_created", "created_at", "id"),
        Index("ix_evaluations_claim", "status", "created_at"),
        Index("ix_evaluations_cache_key", "cache_key", "status"),
        Index("ix_evaluations_model_path", "model_path"),
        Index("ix_evaluations_group", "group_id"),
        Index("ix_evaluations_shard_of", "shard_of"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    model_path: Mapped[str] = mapped_column(Text)
    adapter_path: Mapped[str | None] = mapped_column(Text, default=None)
    model_fingerprint: Mapped[str | None] = mapped_column(String(80), default=None)
    prompt_format: Mapped[str | None] = mapped_column(String(16), default=None)
    generation: Mapped[dict[str, Any]] = mapped_column(JSON)
    # Snapshot of what ran: [{"id", "name", "version", "kind", "content_hash", "items"}].
    suites: Mapped[list[Any]] = mapped_column(JSON)
    results: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    cache_key: Mapped[str | None] = mapped_column(String(80), default=None)
    use_cache: Mapped[bool] = mapped_column(Boolean, default=True)
    cached_from: Mapped[str | None] = mapped_column(String(40), default=None)
    finetune_job_id: Mapped[str | None] = mapped_column(String(40), default=None)
    # Which engine runs it (only workers of that backend claim it); for "openai" the served
    # model's name is ``model_path`` and its server is ``endpoint``.
    backend: Mapped[str] = mapped_column(String(16), default="transformers")
    endpoint: Mapped[str | None] = mapped_column(Text, default=None)
    # What the worker ran it on: {"backend", "device", "dtype", "version", "weights_hashed",
    # "fingerprint_basis"}; /compare refuses pairs whose backend or dtype differ.
    engine: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    # The request that queued it with others (one evaluation per adapter of one base).
    group_id: Mapped[str | None] = mapped_column(String(40), default=None)
    # Sharding (``"shards": N``): the evaluation the user asked for has ``shard_count`` N and
    # is never claimed itself; each of its N shards is a job of its own (``shard_of`` the
    # parent, ``shard_index`` 0..N-1) that scores one slice of the items and stores the rows
    # under the parent. Both are None for an evaluation that is not sharded.
    shard_of: Mapped[str | None] = mapped_column(String(40), default=None)
    shard_index: Mapped[int | None] = mapped_column(Integer, default=None)
    shard_count: Mapped[int | None] = mapped_column(Integer, default=None)


class EvaluationItem(Base):
    """One row per suite item of an evaluation, written as the worker goes."""

    __tablename__ = "evaluation_items"
    __table_args__ = (
        UniqueConstraint("evaluation_id", "suite", "item_id", name="uq_evaluation_items_item"),
        # Covering index: /compare reads every item's outcome without touching the table.
        Index(
            "ix_evaluation_items_outcomes",
            "evaluation_id",
            "suite",
            "position",
            "item_id",
            "passed",
            "score",
            "category",
            "severity",
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    evaluation_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("evaluations.id", ondelete="CASCADE")
    )
    suite: Mapped[str] = mapped_column(String(100))
    item_id: Mapped[str] = mapped_column(String(200))
    position: Mapped[int] = mapped_column(Integer)
    prompt: Mapped[str] = mapped_column(Text)
    response: Mapped[str | None] = mapped_column(Text, default=None)
    passed: Mapped[bool | None] = mapped_column(Boolean, default=None)
    score: Mapped[float | None] = mapped_column(Float, default=None)
    category: Mapped[str | None] = mapped_column(String(100), default=None)
    severity: Mapped[str | None] = mapped_column(String(16), default=None)
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    # The stored response is the first FORGETGUARD_MAX_STORED_RESPONSE_CHARS of a longer one.
    truncated: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class FinetuneJob(JobMixin, Base):
    __tablename__ = "finetune_jobs"
    __table_args__ = (
        Index("ix_finetune_jobs_created", "created_at", "id"),
        Index("ix_finetune_jobs_claim", "status", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    base_model_path: Mapped[str] = mapped_column(Text)
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    before_evaluation_id: Mapped[str | None] = mapped_column(String(40), default=None)
    after_evaluation_id: Mapped[str | None] = mapped_column(String(40), default=None)
    output_path: Mapped[str | None] = mapped_column(Text, default=None)
    checkpoint_path: Mapped[str | None] = mapped_column(Text, default=None)
    comparison: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    warnings: Mapped[list[Any]] = mapped_column(JSON, default=list)
    trainable_parameters: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    # The backend its evaluations run on: only a worker of that backend claims the job.
    backend: Mapped[str] = mapped_column(String(16), default="transformers")
    # Resolved at submission: {"hyperparameters": {...}, "planned_steps": n}; None before 0007.
    resolved: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    # The processes it trains in (request.resources.processes): claimed only by a worker
    # that holds as many (workers.processes).
    processes: Mapped[int] = mapped_column(Integer, default=1, server_default="1")


class FinetuneEvent(Base):
    __tablename__ = "finetune_events"
    __table_args__ = (Index("ix_finetune_events_job", "job_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("finetune_jobs.id", ondelete="CASCADE")
    )
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    level: Mapped[str] = mapped_column(String(16), default="info")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)


class FinetuneCheckpoint(Base):
    """One evaluation of a fine-tune job's weights at an optimizer step (step 0: the base)."""

    __tablename__ = "finetune_checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step", name="uq_finetune_checkpoints_step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("finetune_jobs.id", ondelete="CASCADE")
    )
    step: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    general: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    domain: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    drift: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    verdict: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)


class Claim(Base):
    """Append-only log of every lease taken: evidence that no job had two live leases."""

    __tablename__ = "claims"
    __table_args__ = (Index("ix_claims_job", "job_kind", "job_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_kind: Mapped[str] = mapped_column(String(16))
    job_id: Mapped[str] = mapped_column(String(40))
    worker_id: Mapped[str] = mapped_column(String(64))
    attempt: Mapped[int] = mapped_column(Integer)
    claimed_at: Mapped[datetime] = mapped_column(DateTime)
    lease_expires_at: Mapped[datetime] = mapped_column(DateTime)
    released_at: Mapped[datetime | None] = mapped_column(DateTime, default=None)


class Worker(Base):
    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(255))
    kinds: Mapped[list[Any]] = mapped_column(JSON)
    backend: Mapped[str] = mapped_column(String(16), default="transformers")
    dtype: Mapped[str | None] = mapped_column(String(32), default=None)
    engine_version: Mapped[str | None] = mapped_column(String(100), default=None)
    # How many training processes it can run at once (--processes, or its --devices).
    processes: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    status: Mapped[str] = mapped_column(String(16), default="idle")
    current_job_id: Mapped[str | None] = mapped_column(String(40), default=None)
    current_job_kind: Mapped[str | None] = mapped_column(String(16), default=None)
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # A slot of `forgetguard serve` whose worker cannot start (status "failing" while it is
    # restarted with backoff, "stopped" once serve gave up): why its last start failed.
    error: Mapped[str | None] = mapped_column(Text, default=None)


class IdempotencyKey(Base):
    __tablename__ = "idempotency_keys"

    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    path: Mapped[str] = mapped_column(String(255), primary_key=True)
    body_hash: Mapped[str] = mapped_column(String(80))
    resource_id: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
