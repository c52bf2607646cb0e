"""Status writes outside a worker's lease: submission, the cache, a fine-tune's evaluations."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from app.core.database import immediate_session, make_engine, session_factory
from app.core.tables import Evaluation, FinetuneJob, new_id, utcnow
from app.jobs import lifecycle
from app.jobs.queue import cancel, claim
from app.jobs.status import JobStatus


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def _evaluation(**values: object) -> Evaluation:
    return Evaluation(id=new_id("ev"), model_path="m", generation={}, suites=[], **values)


def _statuses(engine: Engine, *ids: str) -> list[str]:
    with session_factory(engine)() as s:
        return [s.get(Evaluation, i).status for i in ids]  # type: ignore[union-attr]


def test_submit_queues_a_job_or_answers_it_from_the_cache(engine: Engine) -> None:
    with session_factory(engine)() as s:
        source = _evaluation(results={"qa": {"accuracy": 1.0}}, progress={"total": 7})
        lifecycle.submit(s, source)
        fresh, copy = _evaluation(), _evaluation()
        lifecycle.submit(s, fresh)
        lifecycle.submit(s, copy, cached=source)
        s.commit()
        assert copy.cached_from == source.id and copy.results == source.results
        assert copy.progress == {"done": 7, "total": 7, "stage": "done (cached)"}
        assert copy.finished_at is not None
    assert _statuses(engine, source.id, fresh.id, copy.id) == ["queued", "queued", "succeeded"]
    # Only the fresh ones can be claimed.
    claims = [claim(engine, worker_id="w", kinds=("evaluation",), lease_seconds=60) for _ in "abc"]
    assert sorted(c.id for c in claims if c) == sorted([source.id, fresh.id])


def _finetune_with_children(engine: Engine) -> tuple[str, list[str]]:
    """A fine-tune job with a running child, a queued child, and a finished one."""
    with session_factory(engine)() as s:
        job = FinetuneJob(id=new_id("ft"), base_model_path="m", request={})
        lifecycle.submit(s, job)
        s.flush()
        running, queued, done = (_evaluation(finetune_job_id=job.id) for _ in range(3))
        for row in (running, queued, done):
            lifecycle.submit(s, row)
        lifecycle.start_child(running)
        lifecycle.start_child(done)
        s.flush()
        assert lifecycle.succeed_child(s, done.id, results={}, progress={"stage": "done"})
        s.commit()
        return job.id, [running.id, queued.id, done.id]


def test_a_child_evaluation_starts_at_once_and_succeeds_only_while_running(engine: Engine) -> None:
    job_id, (running, queued, done) = _finetune_with_children(engine)
    assert _statuses(engine, running, queued, done) == ["running", "queued", "succeeded"]
    with immediate_session(engine) as s, s.begin():
        assert not lifecycle.succeed_child(s, done, results={}, progress={})
        assert not lifecycle.succeed_child(s, queued, results={}, progress={})
    with session_factory(engine)() as s:
        cached = _evaluation(finetune_job_id=job_id)
        lifecycle.submit(s, cached, cached=s.get(Evaluation, done))
        lifecycle.start_child(cached)  # answered by the cache: stays succeeded
        assert cached.status == JobStatus.SUCCEEDED


def test_cancelling_a_fine_tune_job_cancels_its_unfinished_evaluations(engine: Engine) -> None:
    job_id, children = _finetune_with_children(engine)
    other_job, others = _finetune_with_children(engine)
    with session_factory(engine)() as s:
        assert cancel(s, FinetuneJob, job_id) == "cancelled"
        s.commit()
    assert _statuses(engine, *children) == ["cancelled", "cancelled", "succeeded"]
    assert _statuses(engine, *others) == ["running", "queued", "succeeded"]


def test_failing_children_records_why_and_refuses_other_ends(engine: Engine) -> None:
    job_id, children = _finetune_with_children(engine)
    with immediate_session(engine) as s, s.begin():
        lifecycle.end_children(s, [job_id], JobStatus.FAILED, now=utcnow(), error="oom")
        with pytest.raises(ValueError):
            lifecycle.end_children(s, [job_id], JobStatus.SUCCEEDED, now=utcnow())
    assert _statuses(engine, *children) == ["failed", "failed", "succeeded"]
    with session_factory(engine)() as s:
        assert s.get(Evaluation, children[0]).error == "oom"  # type: ignore[union-attr]
