"""The scheduler gives a job only to a worker whose backend fits it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from app.core.config import Settings
from app.core.database import make_engine, session_factory
from app.core.tables import Evaluation, FinetuneJob, new_id
from app.jobs.queue import claim, claimable_backends


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    engine = make_engine(settings.database_url)
    yield engine
    engine.dispose()


def _evaluation(engine: Engine, backend: str) -> str:
    with session_factory(engine)() as session:
        row = Evaluation(id=new_id("ev"), model_path="m", generation={}, suites=[], backend=backend)
        session.add(row)
        session.commit()
        return row.id


def _claim(engine: Engine, backend: str, kinds: tuple[str, ...] = ("evaluation",)) -> str | None:
    job = claim(
        engine,
        worker_id=f"w-{backend}",
        kinds=kinds,
        lease_seconds=60,
        backends=claimable_backends(backend),
    )
    return job.id if job else None


def test_a_vllm_job_waits_for_a_vllm_worker(engine: Engine) -> None:
    job = _evaluation(engine, "vllm")
    assert _claim(engine, "transformers") is None
    assert _claim(engine, "openai") is None
    assert _claim(engine, "vllm") == job


def test_a_transformers_job_is_not_run_on_vllm(engine: Engine) -> None:
    job = _evaluation(engine, "transformers")
    assert _claim(engine, "vllm") is None
    assert _claim(engine, "transformers") == job


def test_every_worker_evaluates_served_models(engine: Engine) -> None:
    first, second, third = (_evaluation(engine, "openai") for _ in range(3))
    assert _claim(engine, "transformers") == first
    assert _claim(engine, "vllm") == second
    assert _claim(engine, "openai") == third


def test_a_fine_tune_job_goes_to_the_backend_of_its_evaluations(engine: Engine) -> None:
    with session_factory(engine)() as session:
        row = FinetuneJob(id=new_id("ft"), base_model_path="m", request={}, backend="vllm")
        session.add(row)
        session.commit()
        job = row.id
    assert _claim(engine, "transformers", ("finetune",)) is None
    assert _claim(engine, "vllm", ("finetune",)) == job
