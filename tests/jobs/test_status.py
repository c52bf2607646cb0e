"""JobStatus: the only definition of a job's statuses, and the moves the queue makes obey it."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import get_args

import pytest
from sqlalchemy import Engine, update

from app.core.database import immediate_session, make_engine, session_factory
from app.core.schemas import Status
from app.core.tables import Evaluation, new_id, utcnow
from app.jobs.queue import cancel, claim, fail, release, succeed
from app.jobs.status import FINISHED, LIVE, TRANSITIONS, JobStatus, can_move, sources


def test_every_status_is_live_or_finished_and_finished_is_final() -> None:
    assert set(JobStatus) == set(TRANSITIONS) == LIVE | FINISHED and not LIVE & FINISHED
    for status in FINISHED:
        assert not any(can_move(status, new) for new in JobStatus)
    for status in LIVE:
        assert can_move(status, JobStatus.CANCELLED) and not can_move(status, status)


def test_statuses_compare_and_serialize_as_their_values() -> None:
    assert JobStatus.QUEUED == "queued" and f"{JobStatus.FAILED}" == "failed"
    assert "running" in LIVE and "cancelled" in FINISHED
    assert can_move("running", "queued") and not can_move("succeeded", "running")
    assert sources(JobStatus.RUNNING) == (JobStatus.QUEUED,)
    with pytest.raises(ValueError):
        can_move("done", "queued")


def test_the_api_schema_lists_exactly_the_job_statuses() -> None:
    assert list(get_args(Status)) == [s.value for s in JobStatus]


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


class Tracker:
    """One evaluation job whose every status change must be an allowed move."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        with session_factory(engine)() as s:
            row = Evaluation(id=new_id("ev"), model_path="m", generation={}, suites=[])
            s.add(row)
            s.commit()
            self.id = row.id
        self.seen = [self.status()]

    def status(self) -> str:
        with session_factory(self.engine)() as s:
            row = s.get(Evaluation, self.id)
            assert row is not None
            return row.status

    def moved(self) -> str:
        new = self.status()
        if new != self.seen[-1]:
            assert can_move(self.seen[-1], new), f"{self.seen[-1]} → {new} is not a move"
        self.seen.append(new)
        return new

    def ready(self) -> None:
        with session_factory(self.engine)() as s:  # skip the retry backoff
            s.execute(update(Evaluation).values(not_before=utcnow() - timedelta(seconds=1)))
            s.commit()

    def claim(self, worker: str = "w"):  # type: ignore[no-untyped-def]
        return claim(self.engine, worker_id=worker, kinds=("evaluation",), lease_seconds=60)


def test_the_queue_only_makes_allowed_moves(engine: Engine) -> None:
    job = Tracker(engine)
    assert job.seen == ["queued"]
    first = job.claim()
    assert job.moved() == "running"
    assert fail(engine, first, "boom", retryable=True) == "queued" and job.moved() == "queued"
    job.ready()
    second = job.claim()
    assert job.moved() == "running"
    assert release(engine, second) and job.moved() == "queued"
    third = job.claim()
    assert job.moved() == "running"
    with immediate_session(engine) as s, s.begin():
        assert succeed(s, third, results={})
    assert job.moved() == "succeeded"
    assert job.seen == ["queued", "running", "queued", "running", "queued", "running", "succeeded"]


def test_a_finished_job_never_moves_again(engine: Engine) -> None:
    done, dropped = Tracker(engine), Tracker(engine)
    held = done.claim()
    with immediate_session(engine) as s, s.begin():
        assert succeed(s, held, results={})
    with session_factory(engine)() as s:
        assert cancel(s, Evaluation, done.id) == "succeeded"
        assert cancel(s, Evaluation, dropped.id) == "cancelled"
        s.commit()
    assert done.moved() == "succeeded" and dropped.moved() == "cancelled"
    # A worker's late writes to a finished job change nothing.
    assert fail(engine, held, "late", retryable=True) == "succeeded"
    assert not release(engine, held)
    assert done.claim("w2") is None  # nothing left to claim
    assert done.moved() == "succeeded" and dropped.moved() == "cancelled"


def test_the_status_names_are_the_client_package_s() -> None:
    """Defined once, in the client package (which imports nothing of the server); the server
    adds only the moves between them."""
    from forgetguard import client, status

    assert JobStatus is status.JobStatus and FINISHED is status.FINISHED is client.FINISHED
