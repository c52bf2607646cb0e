"""Checkpoint evaluations during training and the guard, on a real worker (tiny model):
rows per evaluated step, served by the API, not redone after a SIGKILL, the shipped step."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from sqlalchemy import select

from app.core.database import session_factory
from app.core.tables import FinetuneCheckpoint
from tests.conftest import start_worker, wait_for
from tests.workers.finetune.jobs import STARTUP, events, plain_body, post_job, succeeded
from tests.workers.finetune.test_holdout import DOMAIN_QA, GENERAL_QA, RECORDS

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)]


def test_checkpoint_evaluations_survive_a_killed_worker_and_the_guard_ships_a_step(
    client,
    fast_lease,
    engine,
    tiny_model_dir,
    procs,
    tmp_path,
) -> None:  # type: ignore[no-untyped-def]
    body = plain_body(
        tiny_model_dir,
        RECORDS,
        method="full",
        hyperparameters={"learning_rate": 1e-3, "max_steps": 12},
        evaluation={
            "suites": [GENERAL_QA, "forgetting-checklist"],
            "generation": {"max_new_tokens": 4},
            "domain": {"holdout": 0.3, "suites": [DOMAIN_QA]},
            "every_steps": 4,
        },
        guard={"max_drop": 0.0, "action": "keep_best"},
    )
    job_id = post_job(client, body)
    assert client.get(f"/finetune-jobs/{job_id}/checkpoints").json()["data"] == []

    def rows() -> list[FinetuneCheckpoint]:
        with session_factory(engine)() as session:
            return list(
                session.scalars(
                    select(FinetuneCheckpoint)
                    .where(FinetuneCheckpoint.job_id == job_id)
                    .order_by(FinetuneCheckpoint.step)
                )
            )

    procs.append(start_worker(fast_lease, log=tmp_path / "worker-a.log"))
    wait_for(lambda: 4 in [r.step for r in rows()], STARTUP + 240, 0.3, "the step-4 evaluation")
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait(timeout=30)
    done_before_kill = [r.step for r in rows()]

    procs.append(start_worker(fast_lease, log=tmp_path / "worker-b.log"))
    data = succeeded(client, engine, job_id, tmp_path / "worker-b.log", STARTUP + 300)
    assert data["attempts"] == 2

    checkpoints = client.get(f"/finetune-jobs/{job_id}/checkpoints").json()["data"]
    assert [c["step"] for c in checkpoints] == [0, 4, 8, 12]
    for c in checkpoints:
        assert set(c) >= {"step", "general", "domain", "drift", "verdict"}
        assert c["general"]["accuracy"] is not None and "checklist_score" in c["general"]
        assert c["domain"]["before"]["nll_per_token"] is not None
        assert "accuracy" in c["domain"]["after"]
        assert c["verdict"]["verdict"] in ("pass", "fail") and c["verdict"]["guard"] in (
            "pass",
            "fail",
        )
    # Step 0 is the base: no drop, no gain.
    assert checkpoints[0]["general"]["accuracy_drop"] == 0
    assert checkpoints[0]["domain"]["gain"]["nll_per_token"] == 0
    # Steps evaluated before the kill were not evaluated again.
    messages = [e.message for e in events(engine, job_id)]
    for step in (4, 8, 12):
        said = [m for m in messages if m.startswith(f"checkpoint evaluation at step {step}:")]
        assert len(said) == 1, (step, said)
    assert 4 in done_before_kill

    # The guard: the final weights when they pass, else the passing step with the best gain.
    by_step = {c["step"]: c for c in checkpoints}
    passing = [c for c in checkpoints[1:] if c["verdict"]["guard"] == "pass"]
    if by_step[12]["verdict"]["guard"] == "pass":
        assert data["shipped_step"] == 12 and "final step passes" in data["shipped_reason"]
    elif passing:
        best = max(passing, key=lambda c: c["domain"]["gain"]["relative_nll"])
        assert data["shipped_step"] == best["step"]
        assert "largest domain gain" in data["shipped_reason"]
    else:
        assert data["shipped_step"] is None and "nothing shipped" in data["shipped_reason"]
    assert data["metrics"]["evaluation_steps"] == [4, 8, 12]


def test_keep_best_with_no_passing_checkpoint_ships_nothing_and_says_so(
    client, engine, settings, tiny_model_dir, procs, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    # Non-inferiority on one question can never be shown: every checkpoint fails the guard.
    body = plain_body(
        tiny_model_dir,
        RECORDS,
        method="full",
        hyperparameters={"learning_rate": 1e-3, "max_steps": 4},
        evaluation={
            "suites": [GENERAL_QA],
            "generation": {"max_new_tokens": 4},
            "domain": False,
            "mode": "noninferiority",
            "every_steps": 2,
        },
        guard={"action": "keep_best"},
    )
    job_id = post_job(client, body)
    procs.append(start_worker(settings, log=tmp_path / "worker.log"))
    data = succeeded(client, engine, job_id, tmp_path / "worker.log")

    checkpoints = client.get(f"/finetune-jobs/{job_id}/checkpoints").json()["data"]
    assert [c["step"] for c in checkpoints] == [0, 2, 4]
    assert all(c["verdict"]["guard"] == "fail" for c in checkpoints[1:])
    # Nothing ships: no output, the base stays the recommendation, and the job says why.
    assert data["output_path"] is None and data["shipped_step"] is None
    assert "no checkpoint passed it: nothing shipped" in data["shipped_reason"]
    assert data["metrics"]["shipped"]["recommendation"] == "base"
    assert not list((settings.artifacts_dir / job_id).glob("shipped-step-*"))
    assert "shipping nothing" in " ".join(e.message for e in events(engine, job_id))
    # The guard shows the rule it applied: the rule book's max_drop.
    assert data["guard"] == {"max_drop": 0.05, "action": "keep_best"}
    # The after-evaluation still measured the trained weights: the evidence for shipping none.
    after = client.get(f"/evaluations/{data['after_evaluation_id']}").json()
    assert after["model"]["path"] == data["metrics"]["final_output_path"]
    assert data["comparison"]["verdict"] == "fail"
    page = client.get(f"/ui/finetune-jobs/{job_id}").text
    assert "Nothing shipped" in page


def test_the_after_evaluation_takes_the_answers_of_the_final_checkpoint_evaluation(
    client, engine, settings, tiny_model_dir, procs, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    import torch

    from app.core.tables import EvaluationItem
    from workers.engine.loading import attach_adapter, load_model, load_tokenizer
    from workers.evaluation.inprocess import run_suites

    body = plain_body(
        tiny_model_dir,
        RECORDS,
        method="lora",
        hyperparameters={"learning_rate": 1e-3, "max_steps": 4},
        evaluation={
            "suites": [GENERAL_QA],
            "generation": {"max_new_tokens": 4},
            "domain": {"holdout": 0.3, "suites": [DOMAIN_QA]},
            "every_steps": 2,
        },
    )
    job_id = post_job(client, body)
    procs.append(start_worker(settings, log=tmp_path / "worker.log"))
    data = succeeded(client, engine, job_id, tmp_path / "worker.log")

    # The after and domain-after evaluations of the final weights are the step-4 evaluation's.
    took = [
        e.message
        for e in events(engine, job_id)
        if "the answers of the checkpoint evaluation at step 4 (the same weights)" in e.message
    ]
    assert len(took) == 2 and GENERAL_QA["name"] in took[0] and DOMAIN_QA["name"] in took[1]
    final = client.get(f"/finetune-jobs/{job_id}/checkpoints").json()["data"][-1]
    assert final["step"] == 4
    assert final["general"]["accuracy"] == data["comparison"]["overall_accuracy_after"]

    # Taken, not made up: the saved weights, evaluated afresh, give the same answers.
    model = attach_adapter(
        load_model(tiny_model_dir, torch.device("cpu")), Path(data["output_path"])
    )
    after = client.get(f"/evaluations/{data['after_evaluation_id']}").json()
    fresh = run_suites(
        model,
        load_tokenizer(tiny_model_dir),
        [GENERAL_QA],
        prompt_format=after["prompt_format"],
        max_new_tokens=4,
    )
    with session_factory(engine)() as session:
        stored = session.scalars(
            select(EvaluationItem)
            .where(
                EvaluationItem.evaluation_id == data["after_evaluation_id"],
                EvaluationItem.suite == GENERAL_QA["name"],
            )
            .order_by(EvaluationItem.position)
        ).all()
        assert [(r.item_id, r.response, r.passed) for r in stored] == [
            (r.item_id, r.response, r.passed) for r in fresh
        ]
