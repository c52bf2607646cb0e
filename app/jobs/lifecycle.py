"""Status writes that are not a worker's own lease: submission, the cache, child evaluations,
and the parent of a sharded evaluation (which is never claimed: its shards are).

A fine-tune job runs its before/after evaluations inside itself, under its own lease: they are
never visible as queued (a worker would claim them as jobs of their own), they succeed when the
job has run them, and they end with the job when it fails or is cancelled. The lease-holding
worker's own writes (claim, succeed, fail, release) and cancellation are in ``queue``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from app.core.tables import Evaluation, FinetuneJob, utcnow
from app.jobs.status import JobStatus, sources


def submit(
    session: Session, row: Evaluation | FinetuneJob, *, cached: Evaluation | None = None
) -> None:
    """Add a new job to the queue, or, given ``cached``, as its finished copy (no run needed).

    ``cached`` is a succeeded evaluation with the same cache key; the copy's items stay with it.
    """
    if cached is None:
        row.status = JobStatus.QUEUED
    else:
        assert isinstance(row, Evaluation), "only evaluations are answered from the cache"
        now = utcnow()
        row.status = JobStatus.SUCCEEDED
        for name, value in cached_copy(cached).items():
            setattr(row, name, value)
        # Created, started and finished in the same instant: never "started" before "created".
        row.created_at = now
        row.started_at = now
        row.finished_at = now
    session.add(row)


def cached_copy(source: Evaluation) -> dict[str, Any]:
    """What an evaluation answered from ``source`` (a succeeded run, same cache key) takes.

    At submission (:func:`submit`) or when a worker claims one that waited for an identical
    run; the items stay with the source.
    """
    total = source.progress.get("total", 0)
    return {
        "cached_from": source.id,
        "results": source.results,
        "model_fingerprint": source.model_fingerprint,
        "engine": source.engine,
        "progress": {"done": total, "total": total, "stage": "done (cached)"},
    }


def start_child(row: Evaluation) -> None:
    """A fine-tune job's new evaluation starts at once (unless the cache already answered it)."""
    if row.status == JobStatus.QUEUED:
        row.status = JobStatus.RUNNING
        row.started_at = utcnow()


def succeed_child(
    session: Session, evaluation_id: str, *, results: dict[str, Any], progress: dict[str, Any]
) -> bool:
    """Record a child evaluation's results; False when it is no longer running (cancelled)."""
    finished = session.execute(
        update(Evaluation)
        .where(Evaluation.id == evaluation_id, Evaluation.status == JobStatus.RUNNING)
        .values(
            status=JobStatus.SUCCEEDED, results=results, finished_at=utcnow(), progress=progress
        )
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    return bool(finished == 1)


def end_children(
    session: Session,
    finetune_job_ids: Sequence[str],
    status: JobStatus,
    *,
    now: datetime,
    error: str | None = None,
) -> None:
    """The unfinished evaluations of these fine-tune jobs end with them: failed or cancelled."""
    if status not in (JobStatus.FAILED, JobStatus.CANCELLED):
        raise ValueError(f"child evaluations end failed or cancelled, not {status}")
    values: dict[str, Any] = {"status": status, "finished_at": now}
    if error is not None:
        values["error"] = error
    session.execute(
        update(Evaluation)
        .where(
            Evaluation.finetune_job_id.in_(list(finetune_job_ids)),
            Evaluation.status.in_(sources(status)),
        )
        .values(**values)
        .execution_options(synchronize_session=False)
    )


def start_sharded(session: Session, parent_id: str, *, now: datetime) -> None:
    """A sharded evaluation is running once one of its shards is claimed (no-op after)."""
    session.execute(
        update(Evaluation)
        .where(Evaluation.id == parent_id, Evaluation.status == JobStatus.QUEUED)
        .values(status=JobStatus.RUNNING, started_at=now)
        .execution_options(synchronize_session=False)
    )


def succeed_sharded(session: Session, parent_id: str, *, now: datetime, **values: Any) -> bool:
    """Record a sharded evaluation's merged results; False when it is no longer running.

    Called in the transaction of its last shard's success, which holds the parent's row
    (``queue.succeed_shard``).
    """
    finished = session.execute(
        update(Evaluation)
        .where(Evaluation.id == parent_id, Evaluation.status == JobStatus.RUNNING)
        .values(status=JobStatus.SUCCEEDED, finished_at=now, error=None, **values)
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    return bool(finished == 1)


def lock_shards(session: Session, parent_ids: Sequence[str], *also: Any) -> None:
    """Lock the shard rows of ``parent_ids`` (and the rows ``also`` selects), in id order.

    The lock order that keeps PostgreSQL free of lock cycles between the transactions that
    write a sharded evaluation: the rows of its shards in id order, then the parent's row. A
    transaction that may write more than one shard (a cancel, a shard failing for good, the
    lease sweep) takes all of them here first; one that writes a single shard (a claim, a
    lease renewal, a success) takes it, then the parent. UPDATEs that match several rows lock
    them in scan order, which two transactions may see differently. (SQLite's ``BEGIN
    IMMEDIATE`` serialises writers, and a read first would only turn a transaction not begun
    for writing into one that cannot upgrade: nothing is sent there.)
    """
    if session.get_bind().dialect.name != "postgresql" or not (parent_ids or also):
        return
    session.execute(
        select(Evaluation.id)
        .where(or_(Evaluation.shard_of.in_(list(parent_ids)), *also))
        .order_by(Evaluation.id)
        .with_for_update()
    )


def end_shards(session: Session, parent_id: str, *, now: datetime) -> None:
    """The unfinished shards of ``parent_id`` are cancelled (the parent was cancelled or
    failed: nothing they could add would be used). Always before the parent's own row is
    written, with every shard row locked first (:func:`lock_shards`)."""
    lock_shards(session, [parent_id])
    session.execute(
        update(Evaluation)
        .where(
            Evaluation.shard_of == parent_id,
            Evaluation.status.in_(sources(JobStatus.CANCELLED)),
        )
        .values(status=JobStatus.CANCELLED, finished_at=now, lease_expires_at=None)
        .execution_options(synchronize_session=False)
    )


def fail_sharded(session: Session, shard_ids: Sequence[str], *, now: datetime, error: str) -> None:
    """Shards that failed for good (attempts used up, or an error retrying cannot cure) fail
    their parent, saying which shard and why; the parent's other shards are cancelled."""
    failed = session.execute(
        select(Evaluation.shard_of, Evaluation.shard_index, Evaluation.shard_count).where(
            Evaluation.id.in_(list(shard_ids)), Evaluation.shard_of.is_not(None)
        )
    ).all()
    for parent_id, index, count in failed:
        fail_parent(
            session, str(parent_id), now=now, error=f"shard {index} of {count} failed: {error}"
        )


def fail_parent(session: Session, parent_id: str, *, now: datetime, error: str) -> None:
    """A sharded evaluation fails (a shard failed for good, or its shards' answers cannot be
    merged); its unfinished shards are cancelled first."""
    end_shards(session, parent_id, now=now)
    progress = session.execute(
        select(Evaluation.progress).where(Evaluation.id == parent_id)
    ).scalar_one_or_none()
    session.execute(
        update(Evaluation)
        .where(Evaluation.id == parent_id, Evaluation.status.in_(sources(JobStatus.FAILED)))
        .values(
            status=JobStatus.FAILED,
            finished_at=now,
            error=error[:2000],
            progress={**(progress or {}), "stage": "failed"},
        )
        .execution_options(synchronize_session=False)
    )
