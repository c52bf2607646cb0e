"""Helpers for fine-tune jobs run through the API on real workers: submit, read the row and its
events, wait for the job to finish."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select

from app.core.database import session_factory
from app.core.tables import FinetuneEvent, FinetuneJob
from tests.conftest import wait_for

STARTUP = 180.0  # a worker imports torch: seconds, more on a busy machine


def post_job(client: Any, body: dict[str, Any]) -> str:
    """POST /finetune-jobs; the new job's id."""
    response = client.post("/finetune-jobs", json=body)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def job(engine: Engine, job_id: str) -> FinetuneJob:
    with session_factory(engine)() as session:
        row = session.get(FinetuneJob, job_id)
        assert row is not None
        return row


def events(engine: Engine, job_id: str) -> list[FinetuneEvent]:
    with session_factory(engine)() as session:
        return list(
            session.execute(
                select(FinetuneEvent)
                .where(FinetuneEvent.job_id == job_id)
                .order_by(FinetuneEvent.id)
            ).scalars()
        )


def wait_until_finished(engine: Engine, job_id: str, timeout: float, what: str = "the job") -> None:
    wait_for(lambda: job(engine, job_id).status in ("succeeded", "failed"), timeout, 1.0, what)


def succeeded(
    client: Any, engine: Engine, job_id: str, log: Path, timeout: float = STARTUP + 240
) -> dict[str, Any]:
    """Wait for the job to finish; its API view, asserted succeeded (else the worker log's tail)."""
    wait_until_finished(engine, job_id, timeout)
    data = client.get(f"/finetune-jobs/{job_id}").json()
    assert data["status"] == "succeeded", (data["error"], log.read_text()[-3000:])
    return dict(data)


def plain_body(model: Path, records: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    """A job request on ``records`` in the plain prompt format with the risky preset, plus
    ``fields`` (method, hyperparameters, evaluation, ...)."""
    return {
        "base_model": {"path": str(model)},
        "dataset": {"examples": records, "prompt_format": "plain"},
        "preset": "risky",
        **fields,
    }
