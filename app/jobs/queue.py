"""The job queue: claim with a lease, heartbeat, release, finish, cancel.

One code path for both databases. A claim is a single ``UPDATE … WHERE id = (SELECT … LIMIT 1
FOR UPDATE SKIP LOCKED) RETURNING``: PostgreSQL skips rows other workers hold; SQLite ignores
the lock clause, and the claim runs inside ``BEGIN IMMEDIATE`` so only one writer is ever
choosing. Every write a worker makes to its job is guarded by ``worker_id`` and
``status = 'running'``: a worker whose lease was taken over, or whose job was cancelled, finds
zero rows updated and stops, so no job is ever run twice at once. Workers make those writes
through :func:`guarded_write`: one transaction that renews the lease, then writes.

Lease times come from one clock, the database's (:func:`db_now`): workers on many hosts
compare leases written by each other, and a skewed host clock must not end a live lease early.
The ``claims`` log is written so that it can prove the promise: a claim's ``claimed_at`` is
read after the claiming UPDATE, hence after the previous holder's lease ended or its release
committed.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Engine, and_, delete, exists, func, or_, select, text, true, update
from sqlalchemy.orm import Session, aliased

from app.core.database import immediate_session
from app.core.tables import Claim, Evaluation, FinetuneJob, JobMixin, Worker, utcnow
from app.jobs.lifecycle import (
    end_children,
    end_shards,
    fail_sharded,
    lock_shards,
    start_sharded,
)
from app.jobs.status import JobStatus, sources

JOB_MODELS: dict[str, type[Evaluation] | type[FinetuneJob]] = {
    "evaluation": Evaluation,
    "finetune": FinetuneJob,
}
BACKOFF_BASE_SECONDS = 2.0
BACKOFF_MAX_SECONDS = 60.0


class LeaseLost(RuntimeError):
    """The worker no longer holds the job: cancelled, or its lease expired and was taken."""


@dataclass(frozen=True)
class ClaimedJob:
    kind: str
    id: str
    attempt: int
    worker_id: str


def backoff_seconds(attempt: int) -> float:
    """Exponential backoff before a failed job's next attempt."""
    return float(min(BACKOFF_MAX_SECONDS, BACKOFF_BASE_SECONDS * 2 ** max(0, attempt - 1)))


def db_now(session: Session) -> datetime:
    """Naive UTC "now" by the database's clock (PostgreSQL), or this host's (SQLite).

    SQLite lives on one host, so its clock is the host's; the transaction is begun first so
    that, under ``BEGIN IMMEDIATE``, the time is read after the write lock is held.
    """
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        return connection.execute(text("SELECT timezone('UTC', clock_timestamp())")).scalar_one()
    return utcnow()


def default_worker_id() -> str:
    """``host-pid``: unique among live workers and readable in ``GET /workers``."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _expire_leases(session: Session, model: type[JobMixin], now: Any) -> None:
    """Jobs whose worker stopped heartbeating go back to the queue, or fail when out of tries.

    A fine-tune job that fails this way takes its before/after evaluations with it: they are
    run inside the job (never claimable on their own) and would otherwise stay "running".
    """
    expired = and_(model.status == JobStatus.RUNNING, model.lease_expires_at < now)
    last_try = and_(expired, model.attempts >= model.max_attempts)
    error = "lease expired: the worker stopped heartbeating on its last allowed attempt"
    if model is Evaluation:  # every row written below, and the shards a dying one cancels
        parents = session.scalars(select(Evaluation.shard_of).where(last_try)).all()
        lock_shards(session, [p for p in parents if p is not None], expired)
    # Read (again, for evaluations) once the locks are held: what a concurrent cancel or
    # failure committed meanwhile is seen, under READ COMMITTED as under SQLite's write lock.
    dying = list(session.execute(select(model.id).where(last_try)).scalars())  # type: ignore[attr-defined]
    if dying and model is FinetuneJob:
        end_children(
            session, dying, JobStatus.FAILED, now=now, error=f"fine-tune job failed: {error}"
        )
    session.execute(
        update(model)
        .where(last_try)
        .values(status=JobStatus.FAILED, finished_at=now, lease_expires_at=None, error=error)
        .execution_options(synchronize_session=False)
    )
    if dying and model is Evaluation:  # a shard that failed for good fails its evaluation
        fail_sharded(session, dying, now=now, error=error)
    session.execute(
        update(model)
        .where(expired)
        .values(
            status=JobStatus.QUEUED,
            worker_id=None,
            lease_expires_at=None,
            error="previous attempt's lease expired (worker stopped heartbeating)",
        )
        .execution_options(synchronize_session=False)
    )


def _not_waiting(model: type[JobMixin]) -> Any:
    """An evaluation that may take the cache waits while an identical one runs.

    Identical means the same cache key (model fingerprint, suite contents, prompt format,
    generation, backend): two such runs give the same numbers, so the later one waits for the
    running one and is then answered from it (the worker checks the cache before it loads a
    model, :func:`app.evaluations.cache.find_source`). If the running one fails or is
    cancelled, the waiting one is claimable again and runs itself. Fine-tune jobs never wait.
    """
    if model is not Evaluation:
        return true()
    running = aliased(Evaluation)
    identical_running = exists().where(
        running.cache_key == Evaluation.cache_key,
        running.status == JobStatus.RUNNING,
        running.id != Evaluation.id,
    )
    return or_(~Evaluation.use_cache, Evaluation.cache_key.is_(None), ~identical_running)


def claimable(model: type[JobMixin]) -> Any:
    """A sharded evaluation is never claimed itself: its shards are (``app.evaluations.shards``)."""
    if model is not Evaluation:
        return true()
    return or_(Evaluation.shard_count.is_(None), Evaluation.shard_of.is_not(None))


def claim(
    engine: Engine,
    *,
    worker_id: str,
    kinds: tuple[str, ...],
    lease_seconds: float,
    backends: tuple[str, ...] = ("transformers", "openai"),
    processes: int = 1,
) -> ClaimedJob | None:
    """Atomically take the oldest claimable job of the given kinds, or return None.

    Only jobs whose ``backend`` is one of ``backends`` (the engines this worker runs) are
    taken: a vLLM job waits for a vLLM worker instead of running on another engine. An
    evaluation identical to a running one waits for it (:func:`_not_waiting`). A fine-tune
    job that trains in more processes than this worker holds (``processes``) waits for a
    larger worker.
    """
    with immediate_session(engine) as session, session.begin():
        now = db_now(session)
        expires = now + timedelta(seconds=lease_seconds)
        for kind in kinds:
            model = JOB_MODELS[kind]
            _expire_leases(session, model, now)
            candidate = (
                select(model.id)
                .where(
                    model.status == JobStatus.QUEUED,
                    or_(model.not_before.is_(None), model.not_before <= now),
                    model.backend.in_(backends),
                    claimable(model),
                    _not_waiting(model),
                    *([model.processes <= processes] if model is FinetuneJob else []),
                )
                .order_by(model.created_at, model.id)
                .limit(1)
                .with_for_update(skip_locked=True)
                .scalar_subquery()
            )
            row = session.execute(
                update(model)
                .where(model.id == candidate, model.status == JobStatus.QUEUED)
                .values(
                    status=JobStatus.RUNNING,
                    worker_id=worker_id,
                    attempts=model.attempts + 1,
                    lease_expires_at=expires,
                    heartbeat_at=now,
                    started_at=func.coalesce(model.started_at, now),
                    not_before=None,
                )
                .returning(model.id, model.attempts)
                .execution_options(synchronize_session=False)
            ).first()
            if row is None:
                continue
            job_id, attempt = row
            if model is Evaluation:
                parent = session.execute(
                    select(Evaluation.shard_of).where(Evaluation.id == job_id)
                ).scalar_one()
                if parent is not None:  # its evaluation runs from its first shard's claim on
                    start_sharded(session, parent, now=now)
            session.add(
                Claim(
                    job_kind=kind,
                    job_id=job_id,
                    worker_id=worker_id,
                    attempt=attempt,
                    # Read after the UPDATE: later than the end of any lease it replaced.
                    claimed_at=db_now(session),
                    lease_expires_at=expires,
                )
            )
            session.execute(
                update(Worker)
                .where(Worker.id == worker_id)
                .values(
                    status="busy", current_job_id=job_id, current_job_kind=kind, heartbeat_at=now
                )
            )
            return ClaimedJob(kind=kind, id=job_id, attempt=attempt, worker_id=worker_id)
    return None


def _held(model: type[JobMixin], job: ClaimedJob) -> Any:
    """The WHERE clause of every write a worker makes to its job: it still holds the lease."""
    return and_(
        model.id == job.id,  # type: ignore[attr-defined]
        model.worker_id == job.worker_id,
        model.status == JobStatus.RUNNING,
    )


def _no_status(values: dict[str, Any]) -> None:
    if "status" in values:
        raise ValueError("a job's status moves only by claim, succeed, fail, release or cancel")


def renew(session: Session, job: ClaimedJob, lease_seconds: float, **values: Any) -> None:
    """Extend the lease (and set ``values``) inside the caller's transaction, or raise LeaseLost.

    Called at the start of every transaction that writes job results, so results are only
    ever written by the lease holder. Workers use it through :func:`guarded_write`.
    """
    _no_status(values)
    model = JOB_MODELS[job.kind]
    now = db_now(session)
    expires = now + timedelta(seconds=lease_seconds)
    result = session.execute(
        update(model)
        .where(_held(model, job))
        .values(heartbeat_at=now, lease_expires_at=expires, **values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise LeaseLost(f"{job.kind} {job.id} is no longer held by {job.worker_id}")
    session.execute(
        update(Claim)
        .where(
            Claim.job_id == job.id, Claim.worker_id == job.worker_id, Claim.attempt == job.attempt
        )
        .values(lease_expires_at=expires)
    )
    session.execute(update(Worker).where(Worker.id == job.worker_id).values(heartbeat_at=now))


@contextmanager
def guarded_write(
    engine: Engine, job: ClaimedJob, lease_seconds: float, **job_values: Any
) -> Iterator[Session]:
    """One write transaction of the lease holder: renew the lease (setting ``job_values``),
    yield the session for the rest of the writes, commit.

    Raises LeaseLost before the body runs when the job is no longer this worker's (cancelled,
    or its lease taken over), so nothing is written. The renewing UPDATE keeps the job's row
    (PostgreSQL's row lock, SQLite's write lock from ``BEGIN IMMEDIATE``) until the commit: the
    job cannot be cancelled or taken over between the check and the body's writes. An error in
    the body rolls everything back, the renewal included.
    """
    with immediate_session(engine) as session, session.begin():
        renew(session, job, lease_seconds, **job_values)
        yield session


def set_job(session: Session, job: ClaimedJob, **values: Any) -> None:
    """Inside :func:`guarded_write`: set fields of the held job that depend on what was read."""
    _no_status(values)
    if not _update_held(session, job, **values):
        raise LeaseLost(f"{job.kind} {job.id} is no longer held by {job.worker_id}")


def still_held(engine: Engine, job: ClaimedJob) -> bool:
    """Whether the worker still holds ``job`` (a read, no write lock): False once it was
    cancelled, finished or taken over. Polled between heartbeats to notice a cancel soon."""
    model = JOB_MODELS[job.kind]
    with engine.connect() as connection:
        row = connection.execute(
            select(model.status, model.worker_id).where(model.id == job.id)
        ).first()
    return row is not None and row.status == JobStatus.RUNNING and row.worker_id == job.worker_id


def heartbeat(engine: Engine, job: ClaimedJob, lease_seconds: float, **values: Any) -> None:
    """Renew the lease in a transaction of its own; raises LeaseLost."""
    with guarded_write(engine, job, lease_seconds, **values):
        pass


def _close_claim(session: Session, job: ClaimedJob, *, held: bool) -> None:
    """The worker is done with ``job``; its claim ends now only if it still held the lease.

    A worker whose lease had already been taken over leaves ``released_at`` empty: its claim
    ended when the lease expired, and the log must not say it held the job any longer.
    """
    now = db_now(session)
    if held:
        session.execute(
            update(Claim)
            .where(
                Claim.job_id == job.id,
                Claim.worker_id == job.worker_id,
                Claim.attempt == job.attempt,
            )
            .values(released_at=now)
        )
    session.execute(
        update(Worker)
        .where(Worker.id == job.worker_id)
        .values(status="idle", current_job_id=None, current_job_kind=None, heartbeat_at=now)
    )


def _update_held(session: Session, job: ClaimedJob, **values: Any) -> bool:
    """Set ``values`` on the job row only while this worker still holds it; whether it did."""
    model = JOB_MODELS[job.kind]
    result = session.execute(
        update(model)
        .where(_held(model, job))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def _guarded_update(session: Session, job: ClaimedJob, **values: Any) -> bool:
    held = _update_held(session, job, **values)
    _close_claim(session, job, held=held)
    return held


def succeed(session: Session, job: ClaimedJob, **values: Any) -> bool:
    """Mark the job succeeded (with ``values``) inside the caller's transaction."""
    return _guarded_update(
        session,
        job,
        status=JobStatus.SUCCEEDED,
        finished_at=db_now(session),
        lease_expires_at=None,
        error=None,
        **values,
    )


def succeed_shard(session: Session, job: ClaimedJob, **values: Any) -> str | None:
    """Mark the held shard job succeeded (with ``values``) inside the caller's transaction;
    returns its parent's id when it was the last shard to succeed (the caller then merges,
    ``lifecycle.succeed_sharded``, in the same transaction), else None.

    The parent's row is locked before the shards are counted (PostgreSQL's row lock; SQLite's
    ``BEGIN IMMEDIATE`` serialises the whole transaction): two shards finishing at once are
    counted one after the other, and exactly one of them sees every shard succeeded.
    """
    if not succeed(session, job, **values):
        raise LeaseLost(f"{job.kind} {job.id} is no longer held by {job.worker_id}")
    parent = session.execute(
        select(Evaluation.shard_of).where(Evaluation.id == job.id)
    ).scalar_one()
    if parent is None:
        return None
    locked = session.execute(
        select(Evaluation.status).where(Evaluation.id == parent).with_for_update()
    ).scalar_one_or_none()
    if locked != JobStatus.RUNNING:
        return None
    # A statement of its own, after the lock: under READ COMMITTED it sees every shard whose
    # success committed before the lock was granted.
    statuses = session.execute(
        select(Evaluation.status).where(Evaluation.shard_of == parent)
    ).scalars()
    return parent if all(s == JobStatus.SUCCEEDED for s in statuses) else None


def fail(engine: Engine, job: ClaimedJob, error: str, *, retryable: bool) -> str:
    """Record a failed attempt: retry later with backoff, or fail for good. Returns the status."""
    model = JOB_MODELS[job.kind]
    with immediate_session(engine) as session, session.begin():
        if model is Evaluation:  # a shard failing for good cancels its siblings: lock them all
            parent = session.scalar(select(Evaluation.shard_of).where(Evaluation.id == job.id))
            lock_shards(session, [parent] if parent is not None else [])
        row = cast(
            "Evaluation | FinetuneJob | None",
            session.get(model, job.id, populate_existing=True),
        )
        now = db_now(session)
        if row is None or row.status != JobStatus.RUNNING or row.worker_id != job.worker_id:
            _close_claim(session, job, held=False)
            return row.status if row is not None else "missing"
        if retryable and row.attempts < row.max_attempts:
            status = JobStatus.QUEUED
            _guarded_update(
                session,
                job,
                status=status,
                worker_id=None,
                lease_expires_at=None,
                error=f"attempt {row.attempts} failed: {error}",
                not_before=now + timedelta(seconds=backoff_seconds(row.attempts)),
            )
        else:
            status = JobStatus.FAILED
            _guarded_update(
                session,
                job,
                status=status,
                finished_at=now,
                lease_expires_at=None,
                error=error,
                progress={**(row.progress or {}), "stage": "failed"},
            )
            if isinstance(row, Evaluation) and row.shard_of is not None:
                fail_sharded(session, [job.id], now=now, error=error)
        return status


def release(engine: Engine, job: ClaimedJob) -> bool:
    """Give a job back to the queue (graceful shutdown); the attempt is not counted."""
    model = JOB_MODELS[job.kind]
    with immediate_session(engine) as session, session.begin():
        return _guarded_update(
            session,
            job,
            status=JobStatus.QUEUED,
            worker_id=None,
            lease_expires_at=None,
            attempts=model.attempts - 1,
        )


def abandon(engine: Engine, job: ClaimedJob) -> None:
    """The worker stops ``job`` after losing it (cancelled, or its lease taken over).

    A cancelled job's claim ends now, as the worker stops; a lease that another worker took
    over ended when it expired, so that claim is left as it is. Either way the worker is idle.
    """
    model = JOB_MODELS[job.kind]
    with immediate_session(engine) as session, session.begin():
        row = cast("Evaluation | FinetuneJob | None", session.get(model, job.id))
        held = (
            row is not None and row.status == JobStatus.CANCELLED and row.worker_id == job.worker_id
        )
        _close_claim(session, job, held=held)


def begin_write(session: Session) -> None:
    """Begin ``session``'s transaction holding SQLite's write lock (``BEGIN IMMEDIATE``).

    For a request that reads a job, then changes it (cancel): under WAL, a deferred transaction
    whose snapshot a worker's commit made stale cannot become a writer and fails at once with
    "database is locked", whatever the busy timeout. A no-op on PostgreSQL, and once begun.
    """
    if not session.in_transaction():
        session.connection(execution_options={"immediate": True})


def cancel(session: Session, model: type[JobMixin], job_id: str) -> str | None:
    """Cancel a queued or running job; returns the resulting status (None if not found).

    A fine-tune job's own before/after evaluations stop with it, and a sharded evaluation's
    shards with it (cancelled first: shard rows are always locked before their parent's).
    """
    now = db_now(session)
    if model is Evaluation:
        end_shards(session, job_id, now=now)
    result = session.execute(
        update(model)
        .where(model.id == job_id, model.status.in_(sources(JobStatus.CANCELLED)))  # type: ignore[attr-defined]
        .values(status=JobStatus.CANCELLED, finished_at=now, lease_expires_at=None)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount == 1:  # type: ignore[attr-defined]
        # Once cancelled no worker can write the row again (writes check status), so the
        # stage it shows is safe to set here: it must not keep saying "queued".
        progress = session.execute(
            select(model.progress).where(model.id == job_id)  # type: ignore[attr-defined]
        ).scalar_one()
        session.execute(
            update(model)
            .where(model.id == job_id)  # type: ignore[attr-defined]
            .values(progress={**(progress or {}), "stage": "cancelled"})
            .execution_options(synchronize_session=False)
        )
    if model is FinetuneJob:  # its before/after evaluations belong to it: they stop with it
        owned = session.execute(
            select(Evaluation.id).where(
                Evaluation.finetune_job_id == job_id,
                Evaluation.status.in_(sources(JobStatus.CANCELLED)),
            )
        ).scalars()
        for evaluation_id in list(owned):
            cancel(session, Evaluation, evaluation_id)
    return session.execute(select(model.status).where(model.id == job_id)).scalar_one_or_none()  # type: ignore[attr-defined]


def claimable_backends(backend: str) -> tuple[str, ...]:
    """The job backends a worker of ``backend`` takes: its own, and served models.

    Evaluating a served model is only HTTP, so every worker can do it; a local-weights job
    waits for a worker of its own backend.
    """
    return (backend,) if backend == "openai" else (backend, "openai")


# What a queued job says while no live worker can take it because starts keep failing.
WAITING_PREFIX = "no live worker for backend "
LIVE_STATUSES = ("idle", "busy")


def largest_finetune_worker(session: Session, *, lease_seconds: float) -> int:
    """The most training processes a live worker that takes fine-tune jobs holds (0: none)."""
    now = db_now(session)
    rows = session.execute(
        select(Worker.processes, Worker.kinds).where(
            Worker.status.in_(LIVE_STATUSES),
            Worker.heartbeat_at >= now - timedelta(seconds=lease_seconds),
        )
    ).all()
    return max((int(p) for p, kinds in rows if "finetune" in (kinds or [])), default=0)


def _note_waiting(
    session: Session, backend: str, note: str | None, *, now: Any, lease_seconds: float = 60.0
) -> None:
    """Set (or, with None, clear) the waiting note on queued jobs of ``backend``.

    Only the note is touched: a job holding another error (its previous attempt's) keeps it.
    A note is set only while no live worker, on any host, takes jobs of that backend.
    """
    if note is not None:
        live = session.execute(
            select(Worker.backend).where(
                Worker.status.in_(LIVE_STATUSES),
                Worker.heartbeat_at >= now - timedelta(seconds=lease_seconds),
            )
        ).scalars()
        if any(backend in claimable_backends(b) for b in live):
            note = None
    for model in JOB_MODELS.values():
        session.execute(
            update(model)
            .where(
                model.status == JobStatus.QUEUED,
                model.backend == backend,
                or_(model.error.is_(None), model.error.startswith(WAITING_PREFIX))
                if note is not None
                else model.error.startswith(WAITING_PREFIX),
            )
            .values(error=note)
            .execution_options(synchronize_session=False)
        )


def record_start_failure(
    engine: Engine,
    *,
    worker_id: str,
    backend: str,
    kinds: tuple[str, ...],
    device: str,
    pid: int,
    reason: str,
    failures: int,
    next_start_in: float | None,
    lease_seconds: float,
) -> str:
    """A worker slot whose starts fail: listed by ``GET /workers`` as ``failing`` (restarted in
    ``next_start_in`` seconds) or ``stopped`` (None: given up), and named by every queued job of
    its backend while no live worker takes them. Returns that note. Called again while the
    slot stays down, so the listing and the notes stay current."""
    note = f"{WAITING_PREFIX}{backend}: last start failed with {reason}"
    if next_start_in is None:
        note += f"; serve stopped restarting it after {failures} failed starts (fix it, restart)"
    else:
        note += f"; failed start {failures}, next try in {next_start_in:.0f} s"
    with immediate_session(engine) as session, session.begin():
        now = db_now(session)
        values = {
            "host": socket.gethostname(),
            "pid": pid,
            "device": device,
            "kinds": list(kinds),
            "backend": backend,
            "status": "failing" if next_start_in is not None else "stopped",
            "current_job_id": None,
            "current_job_kind": None,
            "heartbeat_at": now,
            "error": note[:2000],
        }
        updated = session.execute(update(Worker).where(Worker.id == worker_id).values(**values))
        if not updated.rowcount:  # type: ignore[attr-defined]
            session.add(Worker(id=worker_id, started_at=now, **values))
        _note_waiting(session, backend, note[:2000], now=now, lease_seconds=lease_seconds)
    return note


def clear_start_failure(engine: Engine, worker_id: str) -> None:
    """Forget a slot's failure record (serve stops, or its worker is up again)."""
    with immediate_session(engine) as session, session.begin():
        session.execute(
            delete(Worker).where(Worker.id == worker_id, Worker.status.in_(("failing", "stopped")))
        )


def register_worker(
    engine: Engine,
    *,
    worker_id: str,
    device: str,
    kinds: tuple[str, ...],
    backend: str = "transformers",
    dtype: str | None = None,
    engine_version: str | None = None,
    processes: int = 1,
) -> None:
    """Announce a live worker, its engine and capacity (shown by ``GET /workers``)."""
    with immediate_session(engine) as session, session.begin():
        now = db_now(session)
        # Rows of workers killed without deregistering (SIGKILL, lost hosts) go after a day.
        stale = Worker.heartbeat_at < now - timedelta(days=1)
        session.execute(delete(Worker).where(or_(Worker.id == worker_id, stale)))
        session.add(
            Worker(
                id=worker_id,
                host=socket.gethostname(),
                pid=os.getpid(),
                device=device,
                kinds=list(kinds),
                backend=backend,
                dtype=dtype,
                engine_version=engine_version,
                processes=processes,
                started_at=now,
                heartbeat_at=now,
            )
        )
        # Jobs that waited on failing starts can be taken now: their note no longer holds.
        for taken in claimable_backends(backend):
            _note_waiting(session, taken, None, now=now)


def worker_heartbeat(engine: Engine, worker_id: str) -> None:
    """Mark the worker alive while it idles."""
    with immediate_session(engine) as session, session.begin():
        session.execute(
            update(Worker).where(Worker.id == worker_id).values(heartbeat_at=db_now(session))
        )


def deregister_worker(engine: Engine, worker_id: str) -> None:
    """Remove a worker that is shutting down."""
    with immediate_session(engine) as session, session.begin():
        session.execute(delete(Worker).where(Worker.id == worker_id))
