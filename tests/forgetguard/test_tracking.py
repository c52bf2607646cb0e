"""``forgetguard gate --mlflow URI``: a real local MLflow store gets a run with the drop metric,
the per-category numbers, the verdict and the Markdown report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from forgetguard.tracking import COMPARISON, REPORT, comparison_metrics
from tests.forgetguard.gate.test_run import finish, gate, submit

mlflow = pytest.importorskip("mlflow", reason="the mlflow extra is not installed")

pytestmark = pytest.mark.one_db


def _runs(uri: str) -> list[Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("forgetguard")
    assert experiment is not None
    return list(client.search_runs([experiment.experiment_id]))


def test_a_failing_gate_run_is_logged_with_its_drop_and_report(
    client: Any, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a SQLite store keeps its artifacts in ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    before, after = submit(client, tiny_model_dir), submit(client, tiny_model_dir)
    finish(client, before)
    finish(client, after, wrong={f"q{i}" for i in range(10, 20)}, failing_checks={"lists"})
    code, _out, err = gate(client, tmp_path, before=before, after=after, mlflow=uri)
    assert code == 1, err
    assert "logged to MLflow" in err
    (run,) = _runs(uri)
    metrics = run.data.metrics
    assert metrics["accuracy_drop"] == pytest.approx(0.5)
    assert metrics["overall_accuracy_before"] == 1.0 and metrics["verdict_pass"] == 0.0
    assert metrics["category.science.drop"] == pytest.approx(1.0)
    assert metrics["checklist.newly_failing"] == 1.0
    assert run.data.tags["forgetguard.verdict"] == "fail"
    assert run.data.params["before"] == before and run.info.status == "FINISHED"
    from mlflow.tracking import MlflowClient

    artifacts = Path(MlflowClient(tracking_uri=uri).download_artifacts(run.info.run_id, ""))
    assert (artifacts / REPORT).read_text().startswith("## forgetguard gate: ❌ FAIL")
    assert json.loads((artifacts / COMPARISON).read_text())["after"] == after


def test_an_unusable_tracking_uri_is_a_gate_error_not_a_traceback(
    client: Any, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    before = submit(client, tiny_model_dir)
    finish(client, before)
    code, _out, err = gate(client, tmp_path, before=before, after=before, mlflow="nope://x")
    assert code == 2
    assert "cannot log to MLflow at nope://x" in err.strip().splitlines()[-1]


def test_metrics_are_flat_numbers_with_safe_names() -> None:
    comparison = {
        "overall_accuracy_before": 0.6,
        "overall_accuracy_after": 0.5,
        "accuracy_drop": 0.1,
        "verdict": "pass",
        "category_drops": {"world history (1900+)": {"before": 0.5, "after": 0.4, "drop": 0.1}},
        "statistics": {"mcnemar_p_value": 0.2, "drop_ci95": [-0.05, 0.25], "n_pairs": 10},
        "drift": {"general-text": {"nll_before": 2.8, "nll_after": 3.1, "note": "text"}},
    }
    metrics = comparison_metrics(comparison)
    assert metrics["category.world history _1900__.drop"] == pytest.approx(0.1)
    assert metrics["statistics.drop_ci95_high"] == 0.25 and metrics["verdict_pass"] == 1.0
    assert metrics["drift.general-text.nll_after"] == 3.1
    assert all(isinstance(v, float) for v in metrics.values())
