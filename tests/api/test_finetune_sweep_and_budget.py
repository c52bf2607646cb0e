"""Submission-time refusals of a fine-tune job: a sweep of a job whose dataset file changed
since it was split (409), and a checkpoint cadence that derives more evaluations than the cap
(422, naming the fields and the derived count)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from app.core.database import make_engine, session_factory
from app.core.tables import FinetuneJob
from app.finetune.schemas import (
    MAX_CHECKPOINT_EVALUATIONS,
    evaluation_count,
    evaluation_steps,
    records_sha256,
)
from tests.samples import CAPITAL_QUESTION

RECORDS = [
    {"prompt": f"What is drug {i}?", "completion": f"Drug {i} treats pain."} for i in range(30)
]
SUITE = {"name": "tiny-qa", "kind": "qa", "items": [CAPITAL_QUESTION]}


def _write(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def _body(model: Path, dataset: Path | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "base_model": {"path": str(model)},
        "dataset": {"path": str(dataset)} if dataset else {"examples": RECORDS},
        "evaluation": {"suites": [SUITE], **extra.pop("evaluation", {})},
        **extra,
    }


def _finish(settings: Any, job_id: str, **metrics: Any) -> None:
    """Mark a queued job succeeded as a worker would, with these metrics."""
    engine = make_engine(settings.database_url)
    with session_factory(engine)() as session:
        row = session.get(FinetuneJob, job_id)
        assert row is not None
        row.status, row.output_path, row.metrics = "succeeded", "adapter", metrics
        session.commit()
    engine.dispose()


def test_a_sweep_of_a_job_whose_dataset_file_changed_is_409(
    client: Any, settings: Any, tiny_model_dir: Path
) -> None:
    dataset = settings.data_roots[0] / "drugs.jsonl"
    _write(dataset, RECORDS)
    reply = client.post("/finetune-jobs", json=_body(tiny_model_dir, dataset))
    assert reply.status_code == 202, reply.text
    job_id = reply.json()["id"]
    _finish(settings, job_id, dataset={"records": 30, "sha256": records_sha256(RECORDS)})

    same = client.post(f"/finetune-jobs/{job_id}/interpolations", json={"alphas": [0.5]})
    assert same.status_code == 202, same.text

    _write(dataset, [*RECORDS[5:], *RECORDS[:5]])  # the same records, another order: another split
    changed = client.post(f"/finetune-jobs/{job_id}/interpolations", json={"alphas": [0.5]})
    assert changed.status_code == 409, changed.text
    problem = changed.json()
    assert changed.headers["content-type"].startswith("application/problem+json")
    assert problem["title"] == "Dataset changed"
    assert str(dataset) in problem["detail"] and job_id in problem["detail"]
    # A sweep of the sweep is checked against the job that was trained.
    _finish(settings, same.json()["id"], dataset={"records": 30, "sha256": "other"})
    again = client.post(f"/finetune-jobs/{same.json()['id']}/interpolations", json={})
    assert again.status_code == 409 and job_id in again.json()["detail"]


@pytest.mark.parametrize(
    ("total", "every", "checkpoints"),
    [(1, 1, None), (10, 3, None), (10, 10, None), (1000, 7, None), (37, None, 5), (3, None, 100)],
)
def test_the_derived_count_is_the_number_of_evaluated_steps(
    total: int, every: int | None, checkpoints: int | None
) -> None:
    expected = len(evaluation_steps(total, every, checkpoints))
    assert evaluation_count(total, every, checkpoints) == expected


def test_every_steps_that_derives_too_many_evaluations_is_422(
    client: Any, settings: Any, tiny_model_dir: Path
) -> None:
    huge = _body(
        tiny_model_dir,
        hyperparameters={"max_steps": 10_000_000},
        evaluation={"every_steps": 1},
    )
    reply = client.post("/finetune-jobs", json=huge)
    assert reply.status_code == 422, reply.text
    problem = reply.json()
    assert "10000000 checkpoint evaluations" in problem["detail"]
    assert "evaluation.every_steps" in problem["detail"]
    assert "hyperparameters.max_steps" in problem["detail"]
    assert {tuple(e["loc"]) for e in problem["errors"]} == {
        ("body", "evaluation", "every_steps"),
        ("body", "hyperparameters", "max_steps"),
    }

    # Exactly the cap is accepted: 1000 steps, every 10th.
    ok = _body(tiny_model_dir, hyperparameters={"max_steps": 1000}, evaluation={"every_steps": 10})
    assert client.post("/finetune-jobs", json=ok).status_code == 202
    over = _body(
        tiny_model_dir, hyperparameters={"max_steps": 1001}, evaluation={"every_steps": 10}
    )
    assert client.post("/finetune-jobs", json=over).status_code == 422
    assert MAX_CHECKPOINT_EVALUATIONS == 100


def test_the_total_steps_follow_the_dataset_when_max_steps_is_unset(
    client: Any, settings: Any, tiny_model_dir: Path
) -> None:
    # 30 records, 20 % held out: 24 trained on, batch 1, 10 epochs (risky) = 240 steps.
    dataset = settings.data_roots[0] / "drugs.jsonl"
    _write(dataset, RECORDS)
    body = _body(tiny_model_dir, dataset, preset="risky", evaluation={"every_steps": 1})
    reply = client.post("/finetune-jobs", json=body)
    assert reply.status_code == 422, reply.text
    assert "240 checkpoint evaluations" in reply.json()["detail"]
    body["evaluation"]["every_steps"] = 3  # 80 evaluations
    assert client.post("/finetune-jobs", json=body).status_code == 202
    # With replay the job trains on more examples: 24 + int(24 × 0.5) = 36 → 360 steps / 3.
    body["replay"] = {"fraction": 0.5}
    reply = client.post("/finetune-jobs", json=body)
    assert reply.status_code == 422 and "120 checkpoint evaluations" in reply.json()["detail"]
