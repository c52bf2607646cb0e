"""Checkpoint evaluations during training and the guard, on a real worker (tiny model):
rows per evaluated step, served by the API, not redone after a SIGKILL, the shipped step."""

from __future__ import annotations

import signal

import pytest
from sqlalchemy import select

from app.core.database import session_factory
from app.core.tables import FinetuneCheckpoint
from tests.conftest import start_worker, wait_for
from tests.workers.finetune.jobs import STARTUP, events, plain_body, post_job, succeeded
from tests.workers.finetune.test_domain import DOMAIN_QA, GENERAL_QA, RECORDS

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
    assert client.get(f"/finetune-jobs/{job_id}/checkpoints").json() == []

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

    checkpoints = client.get(f"/finetune-jobs/{job_id}/checkpoints").json()
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
        assert data["shipped_step"] == 12 and "no checkpoint passed" in data["shipped_reason"]
    assert data["metrics"]["evaluation_steps"] == [4, 8, 12]
