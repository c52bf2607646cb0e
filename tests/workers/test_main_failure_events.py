"""A fine-tune job that fails in the worker says so in its event log, not only in ``error``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.conftest import start_worker


def test_a_job_failing_in_the_worker_writes_a_failure_event(
    client: Any, settings: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    dataset = settings.data_roots[0] / "gone.jsonl"
    dataset.write_text(json.dumps({"text": "Q: What is aspirin?\nA: An NSAID."}) + "\n")
    job = client.post(
        "/finetune-jobs",
        json={
            "base_model": {"path": str(tiny_model_dir)},
            "dataset": {"path": str(dataset)},
            "evaluation": None,
        },
    ).json()
    dataset.unlink()  # accepted at submission, missing when the worker reads it
    worker = start_worker(settings, "--once", "--kinds", "finetune", log=tmp_path / "worker.log")
    assert worker.wait(timeout=300) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    shown = client.get(f"/finetune-jobs/{job['id']}").json()
    assert shown["status"] == "failed" and shown["progress"]["stage"] == "failed"
    events = client.get(f"/finetune-jobs/{job['id']}/events").json()["data"]
    failures = [e for e in events if e["level"] == "error"]
    assert len(failures) == 1 and "gone.jsonl" in failures[0]["message"]
    assert failures[0]["data"]["status"] == "failed"
