"""Errors that cannot go away fail a job at once; a database outage does not cost an attempt."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import regex
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from app.core.config import Settings
from app.core.database import make_engine
from app.core.tables import Evaluation
from app.main import create_app
from workers.main import Worker


@pytest.fixture
def api(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


def _submit(api: TestClient, model: Path) -> str:
    response = api.post(
        "/evaluations", json={"model": {"path": str(model)}, "suites": ["general-qa"]}
    )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def _row(settings: Settings, evaluation_id: str) -> Evaluation:
    engine = make_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            row = conn.execute(select(Evaluation).where(Evaluation.id == evaluation_id)).one()
    finally:
        engine.dispose()
    return row  # type: ignore[return-value]


def _run_once(settings: Settings, runner: Any = None) -> None:
    """A real worker that claims until the queue is empty, or stops after one job."""
    worker = Worker(settings, device="cpu", kinds=("evaluation",), once=True)
    if runner is not None:

        def once(ctx: Any, models: Any) -> None:
            worker.stop.set()  # a released job would be claimed again: one run is enough
            runner(ctx, models)

        worker.runners["evaluation"] = once
    worker.run()


def _broken(settings: Settings, tiny_model_dir: Path, name: str) -> Path:
    model = Path(shutil.copytree(tiny_model_dir, settings.model_roots[-1] / name))
    return model


def test_unreadable_weights_fail_at_once(
    settings: Settings, api: TestClient, tiny_model_dir: Path
) -> None:
    model = _broken(settings, tiny_model_dir, "truncated")
    evaluation_id = _submit(api, model)
    weights = model / "model.safetensors"
    # Truncated after submission, header intact: the worker's own check refuses it.
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _run_once(settings)
    row = _row(settings, evaluation_id)
    assert row.status == "failed" and row.attempts == 1
    assert "model.safetensors is not a valid safetensors file" in (row.error or "")
    # The API refuses such weights at submission already (their size is not the header's).
    refused = api.post("/evaluations", json={"model": {"path": str(model)}})
    assert refused.status_code == 422 and "model.safetensors" in refused.json()["detail"]


def test_a_bad_tokenizer_fails_at_once(
    settings: Settings, api: TestClient, tiny_model_dir: Path
) -> None:
    model = _broken(settings, tiny_model_dir, "bad-tokenizer")
    (model / "tokenizer.json").write_text("{not json")
    evaluation_id = _submit(api, model)
    _run_once(settings)
    row = _row(settings, evaluation_id)
    assert row.status == "failed" and row.attempts == 1
    assert "tokenizer cannot be loaded" in (row.error or "")


def test_a_regex_the_worker_cannot_compile_fails_at_once(
    settings: Settings, api: TestClient, tiny_model_dir: Path
) -> None:
    evaluation_id = _submit(api, tiny_model_dir)

    def compile_fails(_ctx: Any, _models: Any) -> None:
        regex.compile("(unclosed")

    _run_once(settings, compile_fails)
    row = _row(settings, evaluation_id)
    assert row.status == "failed" and row.attempts == 1
    assert "regular expression" in (row.error or "")


def test_a_database_outage_does_not_cost_an_attempt(
    settings: Settings, api: TestClient, tiny_model_dir: Path
) -> None:
    evaluation_id = _submit(api, tiny_model_dir)

    def database_restarts(_ctx: Any, _models: Any) -> None:
        raise OperationalError("UPDATE evaluations …", {}, ConnectionError("server closed"))

    _run_once(settings, database_restarts)
    row = _row(settings, evaluation_id)
    assert row.status == "queued" and row.attempts == 0
    assert row.error is None
