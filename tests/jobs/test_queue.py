"""The queue's promises: one holder per job, expired leases come back, guarded writes."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from app.core.config import Settings
from app.core.database import immediate_session, make_engine, session_factory
from app.core.tables import Claim, Evaluation, EvaluationItem, FinetuneJob, Worker, new_id, utcnow
from app.jobs.queue import (
    LeaseLost,
    abandon,
    begin_write,
    cancel,
    claim,
    fail,
    guarded_write,
    heartbeat,
    register_worker,
    release,
    renew,
    set_job,
    succeed,
)


def _queue(engine, n: int = 1) -> list[str]:  # type: ignore[no-untyped-def]
    ids = []
    with session_factory(engine)() as session:
        for i in range(n):
            row = Evaluation(
                id=new_id("ev"),
                model_path="m",
                generation={},
                suites=[],
                created_at=utcnow() + timedelta(microseconds=i),
            )
            session.add(row)
            ids.append(row.id)
        session.commit()
    return ids


@pytest.fixture
def engine(settings: Settings):  # type: ignore[no-untyped-def]
    engine = make_engine(settings.database_url)
    yield engine
    engine.dispose()


def test_claim_takes_oldest_and_records_a_claim(engine) -> None:  # type: ignore[no-untyped-def]
    first, second = _queue(engine, 2)
    job = claim(engine, worker_id="w1", kinds=("evaluation",), lease_seconds=60)
    assert job is not None and job.id == first and job.attempt == 1
    with session_factory(engine)() as s:
        row = s.get(Evaluation, first)
        assert row.status == "running" and row.worker_id == "w1" and row.lease_expires_at > utcnow()
        assert s.get(Evaluation, second).status == "queued"
        assert [c.job_id for c in s.execute(select(Claim)).scalars()] == [first]


def test_two_claimers_never_get_the_same_job(engine) -> None:  # type: ignore[no-untyped-def]
    ids = _queue(engine, 20)
    got: list[str] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while True:
            job = claim(engine, worker_id=name, kinds=("evaluation",), lease_seconds=60)
            if job is None:
                return
            with lock:
                got.append(job.id)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == sorted(ids)  # every job once, none twice


def test_expired_lease_is_claimed_again(engine) -> None:  # type: ignore[no-untyped-def]
    (job_id,) = _queue(engine)
    first = claim(engine, worker_id="dead", kinds=("evaluation",), lease_seconds=60)
    assert first is not None
    assert claim(engine, worker_id="other", kinds=("evaluation",), lease_seconds=60) is None
    with session_factory(engine)() as s:  # the dead worker's lease runs out
        s.execute(update(Evaluation).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
        s.commit()
    second = claim(engine, worker_id="other", kinds=("evaluation",), lease_seconds=60)
    assert second is not None and second.id == job_id and second.attempt == 2
    # The dead worker's late writes are refused: it no longer holds the job.
    with pytest.raises(LeaseLost):
        heartbeat(engine, first, 60)


def test_expired_lease_on_last_attempt_fails_the_job(engine) -> None:  # type: ignore[no-untyped-def]
    (job_id,) = _queue(engine)
    with session_factory(engine)() as s:
        s.execute(update(Evaluation).values(max_attempts=1))
        s.commit()
    assert claim(engine, worker_id="dead", kinds=("evaluation",), lease_seconds=60) is not None
    with session_factory(engine)() as s:
        s.execute(update(Evaluation).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
        s.commit()
    assert claim(engine, worker_id="other", kinds=("evaluation",), lease_seconds=60) is None
    with session_factory(engine)() as s:
        row = s.get(Evaluation, job_id)
        assert row.status == "failed" and "lease expired" in row.error


def test_failure_retries_with_backoff_then_fails_with_last_error(engine) -> None:  # type: ignore[no-untyped-def]
    (job_id,) = _queue(engine)
    with session_factory(engine)() as s:
        s.execute(update(Evaluation).values(max_attempts=2))
        s.commit()
    job = claim(engine, worker_id="w", kinds=("evaluation",), lease_seconds=60)
    assert fail(engine, job, "boom 1", retryable=True) == "queued"
    # Backoff: not claimable right away.
    assert claim(engine, worker_id="w", kinds=("evaluation",), lease_seconds=60) is None
    with session_factory(engine)() as s:
        s.execute(update(Evaluation).values(not_before=utcnow() - timedelta(seconds=1)))
        s.commit()
    job = claim(engine, worker_id="w", kinds=("evaluation",), lease_seconds=60)
    assert job is not None and job.attempt == 2
    assert fail(engine, job, "boom 2", retryable=True) == "failed"
    with session_factory(engine)() as s:
        row = s.get(Evaluation, job_id)
        assert row.status == "failed" and row.error == "boom 2"
        assert row.progress["stage"] == "failed"  # not the "queued" it was created with


def test_release_puts_job_back_without_counting_the_attempt(engine) -> None:  # type: ignore[no-untyped-def]
    (job_id,) = _queue(engine)
    job = claim(engine, worker_id="w", kinds=("evaluation",), lease_seconds=60)
    assert release(engine, job)
    again = claim(engine, worker_id="w2", kinds=("evaluation",), lease_seconds=60)
    assert again is not None and again.id == job_id and again.attempt == 1


def test_cancel_stops_the_holder_at_its_next_write(engine) -> None:  # type: ignore[no-untyped-def]
    (job_id,) = _queue(engine)
    job = claim(engine, worker_id="w", kinds=("evaluation",), lease_seconds=60)
    with session_factory(engine)() as s:
        assert cancel(s, Evaluation, job_id) == "cancelled"
        s.commit()
    with pytest.raises(LeaseLost), immediate_session(engine) as s, s.begin():
        renew(s, job, 60)
    with immediate_session(engine) as s, s.begin():
        assert succeed(s, job, results={}) is False
    with session_factory(engine)() as s:
        assert s.get(Evaluation, job_id).status == "cancelled"


def test_heartbeat_extends_the_lease(engine) -> None:  # type: ignore[no-untyped-def]
    (job_id,) = _queue(engine)
    job = claim(engine, worker_id="w", kinds=("evaluation",), lease_seconds=5)
    with session_factory(engine)() as s:
        before = s.get(Evaluation, job_id).lease_expires_at
    time.sleep(0.05)
    heartbeat(engine, job, 60)
    with session_factory(engine)() as s:
        assert s.get(Evaluation, job_id).lease_expires_at > before + timedelta(seconds=30)


def test_a_fine_tune_dying_on_its_last_attempt_fails_its_evaluations(engine) -> None:  # type: ignore[no-untyped-def]
    with session_factory(engine)() as s:
        job = FinetuneJob(id=new_id("ft"), base_model_path="m", request={}, max_attempts=1)
        s.add(job)
        s.commit()
    dead = claim(engine, worker_id="dead", kinds=("finetune",), lease_seconds=60)
    assert dead is not None and dead.id == job.id
    with session_factory(engine)() as s:  # the job runs its before-evaluation, then dies
        child = Evaluation(
            id=new_id("ev"),
            model_path="m",
            generation={},
            suites=[],
            status="running",
            finetune_job_id=job.id,
        )
        s.add(child)
        s.execute(update(FinetuneJob).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
        s.commit()
    assert claim(engine, worker_id="other", kinds=("finetune",), lease_seconds=60) is None
    with session_factory(engine)() as s:
        assert s.get(FinetuneJob, job.id).status == "failed"
        row = s.get(Evaluation, child.id)
        assert row.status == "failed" and "fine-tune job failed" in row.error
        assert row.finished_at is not None


def test_a_worker_that_lost_its_job_is_idle_and_its_claim_closed(engine) -> None:  # type: ignore[no-untyped-def]
    (job_id,) = _queue(engine)
    register_worker(engine, worker_id="w", device="cpu", kinds=("evaluation",))
    job = claim(engine, worker_id="w", kinds=("evaluation",), lease_seconds=60)
    with session_factory(engine)() as s:
        assert s.get(Worker, "w").status == "busy"
        assert cancel(s, Evaluation, job_id) == "cancelled"
        s.commit()
    abandon(engine, job)
    with session_factory(engine)() as s:
        worker = s.get(Worker, "w")
        assert worker.status == "idle" and worker.current_job_id is None
        (record,) = s.execute(select(Claim)).scalars()
        assert record.released_at is not None  # it held the job until it stopped


def test_a_taken_over_claim_is_not_closed_by_the_late_worker(engine) -> None:  # type: ignore[no-untyped-def]
    _queue(engine)
    slow = claim(engine, worker_id="slow", kinds=("evaluation",), lease_seconds=60)
    with session_factory(engine)() as s:
        s.execute(update(Evaluation).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
        s.commit()
    assert claim(engine, worker_id="fast", kinds=("evaluation",), lease_seconds=60) is not None
    abandon(engine, slow)
    with session_factory(engine)() as s:
        claims = {c.worker_id: c for c in s.execute(select(Claim)).scalars()}
        assert claims["slow"].released_at is None  # its claim ended when its lease ran out
        assert claims["fast"].released_at is None  # still held


def _item(job_id: str, item_id: str = "q1") -> EvaluationItem:
    return EvaluationItem(
        evaluation_id=job_id, suite="s", item_id=item_id, position=0, prompt="p", passed=True
    )


def _snapshot(engine, job_id: str) -> tuple:  # type: ignore[no-untyped-def]
    """What a guarded write may change: the job's fields, its claim's lease, its items."""
    with session_factory(engine)() as s:
        row = s.get(Evaluation, job_id)
        claims = [c.lease_expires_at for c in s.execute(select(Claim)).scalars()]
        items = s.execute(select(EvaluationItem.item_id)).scalars().all()
        return (row.status, row.progress, row.lease_expires_at, row.heartbeat_at, claims, items)


def test_guarded_write_renews_the_lease_and_commits_the_body(engine) -> None:  # type: ignore[no-untyped-def]
    (job_id,) = _queue(engine)
    job = claim(engine, worker_id="w", kinds=("evaluation",), lease_seconds=5)
    progress = {"done": 1, "total": 2, "stage": "s"}
    with guarded_write(engine, job, 60, progress=progress) as s:
        s.add(_item(job_id))
    status, stored, expires, _, (claim_expires,), items = _snapshot(engine, job_id)
    assert status == "running" and stored == progress and items == ["q1"]
    assert expires > utcnow() + timedelta(seconds=30) and claim_expires == expires


def _cancel(engine, job) -> None:  # type: ignore[no-untyped-def]
    with session_factory(engine)() as s:
        cancel(s, Evaluation, job.id)
        s.commit()


def _take_over(engine, job) -> None:  # type: ignore[no-untyped-def]
    with session_factory(engine)() as s:
        s.execute(update(Evaluation).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
        s.commit()
    assert claim(engine, worker_id="other", kinds=("evaluation",), lease_seconds=60) is not None


@pytest.mark.parametrize("lose", [_cancel, _take_over], ids=["cancelled", "taken-over"])
def test_guarded_write_writes_nothing_once_the_lease_is_lost(engine, lose) -> None:  # type: ignore[no-untyped-def]
    (job_id,) = _queue(engine)
    job = claim(engine, worker_id="w", kinds=("evaluation",), lease_seconds=60)
    lose(engine, job)
    before = _snapshot(engine, job_id)
    ran = []
    with pytest.raises(LeaseLost), guarded_write(engine, job, 60, progress={"done": 9}) as s:
        ran.append(True)
        s.add(_item(job_id))
    assert ran == [] and _snapshot(engine, job_id) == before


def test_an_error_in_a_guarded_write_rolls_back_the_renewal_too(engine) -> None:  # type: ignore[no-untyped-def]
    (job_id,) = _queue(engine)
    job = claim(engine, worker_id="w", kinds=("evaluation",), lease_seconds=5)
    before = _snapshot(engine, job_id)
    with pytest.raises(RuntimeError), guarded_write(engine, job, 60, progress={"done": 9}) as s:
        s.add(_item(job_id))
        s.flush()
        raise RuntimeError("the body failed")
    assert _snapshot(engine, job_id) == before


def test_a_cancel_waits_for_a_guarded_write_in_progress(engine) -> None:  # type: ignore[no-untyped-def]
    """Between the lease check and the commit nobody can take or cancel the job."""
    (job_id,) = _queue(engine)
    job = claim(engine, worker_id="w", kinds=("evaluation",), lease_seconds=60)
    cancelled = threading.Event()

    def cancel_now() -> None:
        _cancel(engine, job)
        cancelled.set()

    with guarded_write(engine, job, 60) as s:
        canceller = threading.Thread(target=cancel_now)
        canceller.start()
        time.sleep(0.5)
        assert not cancelled.is_set()  # blocked on the job's row (or SQLite's write lock)
        set_job(s, job, progress={"done": 7, "total": 9, "stage": "written"})
        s.add(_item(job_id))
    canceller.join(timeout=30)
    status, progress, *_, items = _snapshot(engine, job_id)
    assert cancelled.is_set() and status == "cancelled"
    # The body's writes landed first; the cancel that followed set only its stage.
    assert progress == {"done": 7, "total": 9, "stage": "cancelled"} and items == ["q1"]


def test_status_is_not_a_field_a_guarded_write_sets(engine) -> None:  # type: ignore[no-untyped-def]
    (job_id,) = _queue(engine)
    job = claim(engine, worker_id="w", kinds=("evaluation",), lease_seconds=60)
    with pytest.raises(ValueError, match="status"):
        with guarded_write(engine, job, 60, status="succeeded"):
            pass
    with pytest.raises(ValueError, match="status"), guarded_write(engine, job, 60) as s:
        set_job(s, job, status="succeeded")
    assert _snapshot(engine, job_id)[0] == "running"


def test_a_cancel_that_reads_first_is_not_refused_by_a_worker_s_commit(engine) -> None:  # type: ignore[no-untyped-def]
    """Without the write lock up front, SQLite refuses the cancel: its snapshot went stale."""
    (job_id,) = _queue(engine)
    job = claim(engine, worker_id="w", kinds=("evaluation",), lease_seconds=60)
    outcome: list[str] = []

    def worker_writes() -> None:
        try:
            heartbeat(engine, job, 60)
            outcome.append("renewed")
        except LeaseLost:
            outcome.append("lost")

    with session_factory(engine)() as s:
        begin_write(s)
        assert s.get(Evaluation, job_id).status == "running"
        beat = threading.Thread(target=worker_writes)
        beat.start()
        beat.join(0.5)  # the worker writes meanwhile (on SQLite it waits for this transaction)
        assert cancel(s, Evaluation, job_id) == "cancelled"
        s.commit()
    beat.join(timeout=30)
    assert outcome in (["renewed"], ["lost"])
    with session_factory(engine)() as s:
        assert s.get(Evaluation, job_id).status == "cancelled"


def _queue_identical(
    engine, n: int, *, key: str = "sha256:same", use_cache: bool = True
) -> list[str]:  # type: ignore[no-untyped-def]
    ids = _queue(engine, n)
    with session_factory(engine)() as session, session.begin():
        session.execute(
            update(Evaluation)
            .where(Evaluation.id.in_(ids))
            .values(cache_key="sha256:same", use_cache=use_cache)
        )
    return ids


def test_an_evaluation_identical_to_a_running_one_waits_for_it(engine) -> None:  # type: ignore[no-untyped-def]
    first, second = _queue_identical(engine, 2)
    (other,) = _queue(engine, 1)
    running = claim(engine, worker_id="w1", kinds=("evaluation",), lease_seconds=60)
    assert running is not None and running.id == first
    # The identical one waits; a different one behind it is taken meanwhile.
    taken = claim(engine, worker_id="w2", kinds=("evaluation",), lease_seconds=60)
    assert taken is not None and taken.id == other
    assert claim(engine, worker_id="w3", kinds=("evaluation",), lease_seconds=60) is None
    # Once the running one ends (here: fails for good), the waiting one runs itself.
    assert fail(engine, running, "boom", retryable=False) == "failed"
    again = claim(engine, worker_id="w3", kinds=("evaluation",), lease_seconds=60)
    assert again is not None and again.id == second


def test_an_evaluation_that_refuses_the_cache_never_waits(engine) -> None:  # type: ignore[no-untyped-def]
    first, second = _queue_identical(engine, 2, use_cache=False)
    assert claim(engine, worker_id="w1", kinds=("evaluation",), lease_seconds=60).id == first
    assert claim(engine, worker_id="w2", kinds=("evaluation",), lease_seconds=60).id == second
