"""Fine-tune jobs on real ``forgetguard worker`` processes (tiny model): the whole job, cancel
within one step, SIGKILL then resume from a checkpoint, SIGTERM checkpoints and releases."""

from __future__ import annotations

import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from app.core.database import session_factory
from app.core.tables import Evaluation
from tests.conftest import start_worker, wait_for
from tests.samples import CAPITAL_QUESTION, MEDICINE_RECORDS
from tests.workers.finetune.jobs import STARTUP, events, job, post_job, succeeded
from workers.context import HOLD_AT

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)]

QA = {
    "name": "tiny-general",
    "kind": "qa",
    "items": [
        CAPITAL_QUESTION,
        {
            "id": "q2",
            "question": "How many legs does a spider have?",
            "answers": ["Eight"],
            "category": "bio",
        },
    ],
}


def submit(client: Any, model: Path, *, evaluation: bool = False, **hp: Any) -> str:
    body: dict[str, Any] = {
        "base_model": {"path": str(model)},
        "dataset": {"examples": MEDICINE_RECORDS},
        "method": "lora",
        "preset": "risky",
        "hyperparameters": {"learning_rate": 2e-4, **hp},
        "evaluation": {"suites": [QA], "generation": {"max_new_tokens": 4}} if evaluation else None,
    }
    return post_job(client, body)


def steps(engine: Engine, job_id: str) -> list[int]:
    return [
        int(e.data["step"])
        for e in events(engine, job_id)
        if e.message.startswith("step ") and e.data and "loss" in e.data
    ]


def hold_after(step: int) -> dict[str, str]:
    """The worker's environment to wait after recording ``step`` until a signal reaches it."""
    return {HOLD_AT: f"step:{step}"}


def checkpoint_step(engine: Engine, job_id: str) -> int:
    found = [
        int(e.data["step"])
        for e in events(engine, job_id)
        if e.message.startswith("checkpoint at step")
    ]
    return found[-1] if found else 0


def test_a_job_runs_end_to_end_on_a_worker(
    client, settings, engine, tiny_model_dir, procs, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    from peft import PeftModel

    from workers.engine.loading import load_model

    job_id = submit(client, tiny_model_dir, evaluation=True, max_steps=6)
    procs.append(start_worker(settings, log=tmp_path / "worker.log"))
    data = succeeded(client, engine, job_id, tmp_path / "worker.log")
    assert data["trainable_parameters"]["fraction"] < 0.05
    assert data["metrics"]["global_step"] == data["metrics"]["total_steps"] == 6
    assert data["metrics"]["base_weights"]["unchanged"] is True
    assert len(data["metrics"]["loss_curve"]) == 6
    assert data["comparison"]["verdict"] in ("pass", "fail") and "statistics" in data["comparison"]
    assert data["comparison"]["before"] == data["before_evaluation_id"]
    # The after-evaluation runs the base with the job's adapter, from the artifacts dir.
    with session_factory(engine)() as session:
        after = session.get(Evaluation, data["after_evaluation_id"])
        assert after is not None and after.status == "succeeded" and after.finetune_job_id == job_id
        assert (after.model_path, after.adapter_path) == (str(tiny_model_dir), data["output_path"])
    assert Path(data["output_path"]).parent == settings.artifacts_dir / job_id
    assert not (settings.artifacts_dir / job_id / "checkpoints").exists()  # cleaned up on success
    PeftModel.from_pretrained(
        load_model(tiny_model_dir, __import__("torch").device("cpu")), data["output_path"]
    )
    messages = [
        e["message"]
        for e in client.get(f"/finetune-jobs/{job_id}/events", params={"limit": 500}).json()["data"]
    ]
    for expected in (
        "stage: before evaluation",
        "stage: training",
        "step 6/6",
        "stage: after evaluation",
        "succeeded: verdict",
    ):
        assert any(m.startswith(expected) for m in messages), expected


def test_cancel_stops_a_running_job_within_one_step(
    client, settings, engine, tiny_model_dir, procs, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    job_id = submit(client, tiny_model_dir, max_steps=5000, checkpoint_every_steps=1000)
    procs.append(start_worker(settings, log=tmp_path / "worker.log"))
    wait_for(lambda: len(steps(engine, job_id)) >= 3, STARTUP, 0.5, "training steps")
    cancelled_at = time.time()
    response = client.post(f"/finetune-jobs/{job_id}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"

    log_file = tmp_path / "worker.log"
    line = wait_for(
        lambda: next(
            (ln for ln in log_file.read_text().splitlines() if f"finetune {job_id}: stopped" in ln),
            None,
        ),
        60,
        0.2,
        "the worker to stop",
    )
    stopped_at = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    step_seconds = max(
        float(e.data["seconds"]) for e in events(engine, job_id) if e.message.startswith("step ")
    )
    assert stopped_at - cancelled_at < 2 * step_seconds + 2.0  # within one step (plus clock slack)
    assert job(engine, job_id).status == "cancelled"
    log = events(engine, job_id)
    cancel_at = next(i for i, e in enumerate(log) if e.message == "cancelled by request")
    # Every step is recorded in the transaction that renews the lease: after the cancel, the
    # renewal fails, so no further step can have been recorded.
    assert not [e for e in log[cancel_at:] if e.message.startswith("step ")]
    assert not (settings.artifacts_dir / job_id / "checkpoints").exists()
    assert procs[0].poll() is None  # the worker lives on, ready for the next job


def test_a_killed_worker_s_job_resumes_from_its_checkpoint(
    client, fast_lease, engine, tiny_model_dir, procs, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    total = 40
    job_id = submit(
        client, tiny_model_dir, evaluation=True, max_steps=total, checkpoint_every_steps=5
    )
    # The worker holds after step 12 (a hook, not a timer): killed there on any machine load,
    # its last checkpoint is step 10's and steps 11-12 are lost with it.
    procs.append(start_worker(fast_lease, log=tmp_path / "worker-a.log", env=hold_after(12)))
    wait_for(lambda: 12 in steps(engine, job_id), STARTUP + 120, 0.3, "step 12")
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait(timeout=30)
    killed_at = max(steps(engine, job_id))
    saved = checkpoint_step(engine, job_id)
    assert (saved, killed_at) == (10, 12)

    procs.append(start_worker(fast_lease, log=tmp_path / "worker-b.log"))
    wait_for(
        lambda: job(engine, job_id).status in ("succeeded", "failed"),
        STARTUP + 300,
        1.0,
        "the resumed job",
    )
    done = job(engine, job_id)
    assert done.status == "succeeded", (done.error, (tmp_path / "worker-b.log").read_text()[-3000:])
    assert done.attempts == 2
    assert done.metrics is not None
    assert done.metrics["global_step"] == done.metrics["total_steps"] == total
    assert done.metrics["resumed_from_steps"] == [saved]
    log = events(engine, job_id)
    resumed = next(
        i for i, e in enumerate(log) if e.message.startswith("resumed from the checkpoint")
    )
    assert log[resumed].data["step"] == saved
    after = [int(e.data["step"]) for e in log[resumed:] if e.message.startswith("step ")]
    assert after == list(range(saved + 1, total + 1))  # no restart from zero, no gaps
    assert done.metrics["base_weights"]["unchanged"] is True
    assert done.comparison is not None and done.comparison["verdict"] in ("pass", "fail")


def test_sigterm_checkpoints_the_last_step_and_releases_the_job(
    client, settings, engine, tiny_model_dir, procs, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    job_id = submit(client, tiny_model_dir, max_steps=30, checkpoint_every_steps=1000)
    procs.append(start_worker(settings, log=tmp_path / "worker-a.log", env=hold_after(4)))
    wait_for(lambda: 4 in steps(engine, job_id), STARTUP, 0.3, "step 4")
    procs[0].send_signal(signal.SIGTERM)
    assert procs[0].wait(timeout=120) == 0
    stopped = job(engine, job_id)
    assert stopped.status == "queued" and stopped.attempts == 0  # released, not failed
    # The last finished step, not a periodic one: step 4, where the worker held for the signal.
    assert checkpoint_step(engine, job_id) == max(steps(engine, job_id)) == 4
    saved = 4
    assert stopped.checkpoint_path and Path(stopped.checkpoint_path).is_dir()

    procs.append(start_worker(settings, log=tmp_path / "worker-b.log"))
    wait_for(
        lambda: job(engine, job_id).status in ("succeeded", "failed"), STARTUP + 120, 1.0, "the job"
    )
    done = job(engine, job_id)
    assert done.status == "succeeded", done.error
    assert done.metrics is not None and done.metrics["resumed_from_steps"] == [saved]
    assert done.metrics["global_step"] == 30


def test_job_progress_is_one_figure_that_follows_its_evaluation_and_training(
    client, settings, engine, tiny_model_dir, procs, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """The job's percent runs across stages (never back), its count follows the evaluation it
    is running item by item, and the ETA appears once the work ahead has a measured rate."""
    suite = {
        "name": "tiny-progress",
        "kind": "qa",
        "items": [
            {"id": f"q{i}", "question": f"What is {i} plus one?", "answers": [str(i + 1)]}
            for i in range(24)
        ],
    }
    body: dict[str, Any] = {
        "base_model": {"path": str(tiny_model_dir)},
        "dataset": {"examples": MEDICINE_RECORDS},
        "method": "lora",
        "preset": "risky",
        "hyperparameters": {"learning_rate": 2e-4, "max_steps": 12},
        "evaluation": {"suites": [suite], "generation": {"max_new_tokens": 4}},
    }
    job_id = post_job(client, body)
    every = {"FORGETGUARD_PROGRESS_SECONDS": "0"}

    def progress() -> dict[str, Any]:
        return dict(job(engine, job_id).progress)

    # Held after 8 items of the before-evaluation: the job says so, not just its child.
    procs.append(start_worker(settings, log=tmp_path / "a.log", env={HOLD_AT: "items:8", **every}))
    wait_for(lambda: progress().get("done", 0) >= 8, STARTUP, 0.3, "8 items in the job's progress")
    evaluating = progress()
    assert evaluating["stage"].startswith("before evaluation")
    assert evaluating["total"] == 24
    assert 0 < evaluating["percent"] < 100
    procs[-1].send_signal(signal.SIGTERM)
    assert procs[-1].wait(timeout=120) == 0

    # Held at step 6: items and steps both measured in this attempt, so the ETA is known.
    procs.append(start_worker(settings, log=tmp_path / "b.log", env={**hold_after(6), **every}))
    wait_for(lambda: progress().get("stage") == "training" and progress()["done"] >= 6, STARTUP)
    training = progress()
    assert (training["done"], training["total"]) == (6, 12)
    assert evaluating["percent"] <= training["percent"] < 100
    assert training["eta_seconds"] is not None and training["eta_seconds"] > 0
    procs[-1].send_signal(signal.SIGTERM)
    assert procs[-1].wait(timeout=120) == 0

    procs.append(start_worker(settings, log=tmp_path / "c.log", env=every))
    data = succeeded(client, engine, job_id, tmp_path / "c.log")
    assert data["progress"]["percent"] == 100.0 and data["progress"]["eta_seconds"] == 0.0


def test_the_worker_trains_with_the_hyperparameters_stored_at_submission(
    client, settings, engine, tiny_model_dir, procs, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    from app.core.tables import FinetuneJob

    job_id = submit(client, tiny_model_dir, max_steps=6)
    with session_factory(engine)() as session:  # as if the presets changed since: 3 steps
        row = session.get(FinetuneJob, job_id)
        assert row is not None and row.resolved is not None
        hp = {**row.resolved["hyperparameters"], "max_steps": 3}
        row.resolved = {"hyperparameters": hp, "planned_steps": 3}
        session.commit()
    procs.append(start_worker(settings, log=tmp_path / "worker.log"))
    data = succeeded(client, engine, job_id, tmp_path / "worker.log")
    assert data["metrics"]["total_steps"] == 3
    assert data["hyperparameters"]["max_steps"] == 3
