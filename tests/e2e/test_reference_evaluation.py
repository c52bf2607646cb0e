"""End to end, as a user would: `forgetguard serve` (API + a real worker process) over real
HTTP, evaluating the real reference model; and a worker killed halfway through a job."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from app.core.config import Settings
from app.core.database import make_engine, session_factory
from app.core.tables import EvaluationItem
from tests.conftest import start_serve, start_worker, wait_for

UNSEEN = json.loads((Path(__file__).parent / "data" / "unseen_general_40.json").read_text())
CHECKS = {
    "name": "e2e-checks",
    "kind": "checklist",
    "items": [
        {
            "id": "paris",
            "test": "Knows Paris",
            "prompt": "What is the capital of France?",
            "severity": "critical",
            "check": {"type": "contains", "value": "Paris"},
        },
        {
            "id": "weather",
            "test": "Writes a sentence",
            "prompt": "Write one sentence about the weather.",
            "severity": "high",
            "check": {"type": "min_words", "value": 5},
        },
        {
            "id": "impossible",
            "test": "Says the magic word",
            "prompt": "Say hello.",
            "severity": "low",
            "check": {"type": "icontains", "value": "xylophone-quartz"},
        },
    ],
}


def _wait_finished(http: httpx.Client, evaluation_id: str, timeout: float) -> dict:  # type: ignore[type-arg]
    def finished() -> dict | None:  # type: ignore[type-arg]
        body = http.get(f"/evaluations/{evaluation_id}").json()
        return body if body["status"] in ("succeeded", "failed", "cancelled") else None

    return wait_for(finished, timeout, interval=0.5, what=f"evaluation {evaluation_id}")  # type: ignore[no-any-return]


def _item_counts(settings: Settings, evaluation_id: str) -> tuple[int, int, int]:
    """(rows, distinct items, rows marked passed) stored for an evaluation."""
    engine = make_engine(settings.database_url)
    with session_factory(engine)() as session:
        rows = session.execute(
            select(EvaluationItem.suite, EvaluationItem.item_id, EvaluationItem.passed).where(
                EvaluationItem.evaluation_id == evaluation_id
            )
        ).all()
    engine.dispose()
    return len(rows), len({(r.suite, r.item_id) for r in rows}), sum(bool(r.passed) for r in rows)


@pytest.mark.reference
@pytest.mark.one_db
def test_serve_evaluates_the_reference_model_over_http(
    settings: Settings, reference_model_dir: Path, tmp_path: Path
) -> None:
    server, http = start_serve(
        settings, "--workers", "1", "--device", "cpu", log=tmp_path / "serve.log"
    )
    try:
        request = {
            "model": {"path": str(reference_model_dir)},
            "suites": [UNSEEN, CHECKS],
            "prompt_format": "chat",
            "label": "base",
        }
        response = http.post("/evaluations", json=request)
        assert response.status_code == 202, response.text
        assert response.headers["location"] == f"/evaluations/{response.json()['id']}"
        first = _wait_finished(http, response.json()["id"], 900)
        assert first["status"] == "succeeded", first["error"]

        qa = first["results"]["unseen-general-40"]
        assert qa["total"] == 40 and qa["kind"] == "qa"
        assert set(qa["by_category"]) == {
            "geography",
            "math",
            "science",
            "literature",
            "history",
            "language",
        }
        rows, distinct, correct_rows = _item_counts(settings, first["id"])
        assert rows == distinct == 43
        checklist_passed = first["results"]["e2e-checks"]["passed"]
        assert qa["correct"] + checklist_passed == correct_rows
        assert qa["overall_accuracy"] == qa["correct"] / 40
        assert 0.3 < qa["overall_accuracy"] <= 1.0  # a real instruct model, not noise
        assert first["model"]["fingerprint"].startswith("sha256:")

        checks = first["results"]["e2e-checks"]
        assert checks["passed"] + checks["failed"] == 3 and checks["score"] == checks["passed"] / 3
        failed_tests = {f["test"]: f["severity"] for f in checks["failures"]}
        assert failed_tests.get("Says the magic word") == "low"
        assert "Knows Paris" not in failed_tests

        items = http.get(
            f"/evaluations/{first['id']}/items", params={"passed": "false", "limit": 500}
        ).json()
        assert all(i["passed"] is False for i in items["data"])
        assert len(items["data"]) == 40 - qa["correct"] + checks["failed"]

        second_id = http.post(
            "/evaluations", json={**request, "cache": False, "label": "again"}
        ).json()["id"]
        second = _wait_finished(http, second_id, 900)
        assert second["status"] == "succeeded"
        compare = http.get("/compare", params={"before": first["id"], "after": second_id}).json()
        assert compare["accuracy_drop"] == 0.0
        assert compare["catastrophic_forgetting_detected"] is False
        assert compare["verdict"] == "pass" and compare["reasons"] == []
        assert compare["recommendation"] == "Fine-tuning preserved general capabilities"
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]


@pytest.mark.one_db
def test_killed_worker_job_resumes_on_another_worker(
    client, tiny_model_dir: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    settings: Settings = client.app.state.settings
    settings = settings.model_copy(update={"lease_seconds": 4, "heartbeat_seconds": 1})
    response = client.post(
        "/evaluations",
        json={
            "model": {"path": str(tiny_model_dir)},
            "suites": ["general-qa"],
            "prompt_format": "plain",
            "generation": {"max_new_tokens": 48},
        },
    )
    evaluation_id = response.json()["id"]
    total = response.json()["progress"]["total"]
    first = start_worker(settings, "--worker-id", "doomed", log=tmp_path / "w1.log")
    try:
        # Kill it once part, but not all, of the items are stored.
        wait_for(
            lambda: 0 < _item_counts(settings, evaluation_id)[0] < total,
            300,
            interval=0.05,
            what="the first worker to store some items",
        )
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
    done_by_first = _item_counts(settings, evaluation_id)[0]
    assert 0 < done_by_first < total
    second = start_worker(settings, "--worker-id", "rescuer", log=tmp_path / "w2.log")
    try:
        final = wait_for(
            lambda: (
                (b := client.get(f"/evaluations/{evaluation_id}").json())["status"]
                in ("succeeded", "failed")
                and b
            ),
            300,
            interval=0.5,
            what="the rescue",
        )
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=60) == 0
    assert final["status"] == "succeeded", final["error"]
    assert final["attempts"] == 2
    rows, distinct, _ = _item_counts(settings, evaluation_id)
    assert rows == distinct == total  # exactly one row per item: resumed, not redone
    assert final["results"]["general-qa"]["total"] == total
