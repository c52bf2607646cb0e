"""The gate with a real worker on the tiny model: the noise floor (a rerun of the base at
another batch size; on CPU nothing flips) and ``--finetune-job`` (a job's stored evaluations,
or its output in the artifacts dir evaluated anew on other suites)."""

from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from app.core.tables import FinetuneJob, utcnow
from forgetguard.gate import GateOptions, run_gate
from tests.conftest import start_worker

pytestmark = pytest.mark.one_db

QA = {
    "name": "noise-qa",
    "kind": "qa",
    "items": [
        {
            "id": f"q{i}",
            "question": f"What is {i} plus {i}?",
            "answers": [str(2 * i)],
            "category": "math" if i % 2 else "facts",
        }
        for i in range(12)
    ],
}
CHECKS = {
    "name": "noise-checks",
    "kind": "checklist",
    "items": [
        {
            "id": "words",
            "test": "Says something",
            "prompt": "Say hello.",
            "severity": "low",
            "check": {"type": "min_words", "value": 1},
        },
    ],
}


def _gate(client: Any, tmp_path: Path, **options: Any) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run_gate(
        GateOptions(
            junit=tmp_path / "junit.xml",
            markdown=tmp_path / "gate.md",
            poll_seconds=0.2,
            timeout=600,
            **options,
        ),
        client=client,
        stdout=out,
        stderr=err,
        sleep=time.sleep,
    )
    return code, out.getvalue(), err.getvalue()


def test_noise_floor_and_finetune_job_gates_with_a_real_worker(
    client: Any, settings: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    suites_dir = tmp_path / "suites"
    suites_dir.mkdir()
    qa_file, checks_file = suites_dir / "qa.json", suites_dir / "checks.json"
    qa_file.write_text(json.dumps(QA))
    checks_file.write_text(json.dumps(CHECKS))
    worker = start_worker(settings, "--kinds", "evaluation", log=tmp_path / "worker.log")
    try:
        # 1. Noise floor: the base against itself, plus a rerun at batch size 3.
        code, out, err = _gate(
            client,
            tmp_path,
            base_model=str(tiny_model_dir),
            candidate=str(tiny_model_dir),
            suites=[str(qa_file), str(checks_file)],
            noise_floor=True,
        )
        assert code == 0, err + (tmp_path / "worker.log").read_text()
        assert "noise floor: 0 of 13 items flip" in out
        junit = (tmp_path / "junit.xml").read_text()
        assert '<property name="noise_floor_churn" value="0" />' in junit
        reruns = [
            e
            for e in client.get("/evaluations", params={"limit": 50}).json()["data"]
            if (e["label"] or "").startswith("gate: noise floor")
        ]
        assert len(reruns) == 1
        assert reruns[0]["generation"]["batch_size"] == 3 and reruns[0]["cached_from"] is None
        before_id = client.get("/evaluations", params={"limit": 50}).json()["data"][-1]["id"]

        # 2. --finetune-job: a finished job whose output is a full model in the artifacts dir.
        job = client.post(
            "/finetune-jobs",
            json={
                "base_model": {"path": str(tiny_model_dir)},
                "dataset": {"examples": [{"text": "Q: 1+1?\nA: 2"}]},
                "method": "full",
                "evaluation": {"suites": [QA]},
            },
        ).json()
        output = settings.artifacts_dir / job["id"] / "model"
        shutil.copytree(tiny_model_dir, output)
        with client.app.state.sessionmaker() as session, session.begin():
            session.execute(
                update(FinetuneJob)
                .where(FinetuneJob.id == job["id"])
                .values(
                    status="succeeded",
                    before_evaluation_id=before_id,
                    after_evaluation_id=before_id,
                    output_path=str(output),
                    finished_at=utcnow(),
                )
            )
        code, _, err = _gate(client, tmp_path, finetune_job=job["id"])
        assert code == 0 and f"gating the stored evaluations of {job['id']}" in err, err

        # Another suite than the job ran: its output (under the artifacts dir) is evaluated.
        code, out, err = _gate(client, tmp_path, finetune_job=job["id"], suites=[str(checks_file)])
        assert code == 0, err
        assert f"evaluating {job['id']}'s output" in err
        candidates = [
            e
            for e in client.get("/evaluations", params={"limit": 50}).json()["data"]
            if e["model"]["path"] == str(output)
        ]
        assert candidates and candidates[0]["status"] == "succeeded"
    finally:
        worker.terminate()
        worker.wait(timeout=60)
