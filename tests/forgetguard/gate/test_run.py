"""``forgetguard gate`` against an in-process API: exit codes, the stderr line, JUnit and
Markdown reports, waiting, idempotent submission, and errors (unreachable, failed, timeout)."""

from __future__ import annotations

import io
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from app.core.tables import Evaluation
from forgetguard.client import idempotency_key
from forgetguard.gate import GateOptions, compare_params, run_gate
from forgetguard.rules import CompareRules
from tests.conftest import REPO, free_port
from tests.stored import qa_row, store_finished

pytestmark = pytest.mark.one_db

QA = {
    "name": "gate-qa",
    "kind": "qa",
    "items": [
        {
            "id": f"q{i}",
            "question": f"Question {i}?",
            "answers": [f"a{i}"],
            "category": "geography" if i < 10 else "science",
        }
        for i in range(20)
    ],
}
CHECKS = {
    "name": "gate-checks",
    "kind": "checklist",
    "items": [
        {
            "id": "lists",
            "test": "Lists three countries",
            "prompt": "List three countries.",
            "severity": "critical",
            "check": {"type": "min_titlecase_words", "value": 3},
        },
        {
            "id": "short",
            "test": "Answers briefly",
            "prompt": "Say hi.",
            "severity": "low",
            "check": {"type": "max_words", "value": 5},
        },
    ],
}


def submit(client: Any, model: Path) -> str:
    response = client.post(
        "/evaluations", json={"model": {"path": str(model)}, "suites": [QA, CHECKS], "cache": False}
    )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def finish(
    client: Any,
    evaluation_id: str,
    *,
    wrong: set[str] = frozenset(),  # type: ignore[assignment]
    failing_checks: set[str] = frozenset(),
    status: str = "succeeded",  # type: ignore[assignment]
    error: str | None = None,
    checks: bool = True,
) -> None:
    """Store what a worker would: items of the QA suite (and the checklist unless not
    ``checks``), then the final status."""
    rows = []
    for n, item in enumerate(QA["items"]):
        ok = item["id"] not in wrong
        response = item["answers"][0] if ok else "drug drug"
        rows.append(
            qa_row(
                evaluation_id,
                "gate-qa",
                n,
                item,
                response=response,
                passed=ok,
                category=item["category"],
            )
        )
    for n, item in enumerate(CHECKS["items"] if checks else []):
        ok = item["id"] not in failing_checks
        rows.append(
            {
                "evaluation_id": evaluation_id,
                "suite": "gate-checks",
                "item_id": item["id"],
                "position": n,
                "prompt": item["prompt"],
                "response": "France, Spain, Italy",
                "passed": ok,
                "score": float(ok),
                "category": "general",
                "severity": item["severity"],
                "details": {"test": item["test"]},
            }
        )
    store_finished(client, evaluation_id, rows, status=status, error=error, results={})


def gate(client: Any, tmp_path: Path, **options: Any) -> tuple[int, str, str]:
    """Run the gate in-process on ``client``; returns (exit code, stdout, stderr). Options named
    like a rule of the rule book (``max_category_drop=…``) become its ``rules``."""
    out, err = io.StringIO(), io.StringIO()
    defaults: dict[str, Any] = {
        "junit": tmp_path / "junit.xml",
        "markdown": tmp_path / "gate.md",
        "poll_seconds": 0.05,
        "timeout": 30,
    }
    rules = CompareRules(**{k: options.pop(k) for k in CompareRules.model_fields if k in options})
    code = run_gate(
        GateOptions(**{**defaults, **options}, rules=rules),
        client=client,
        stdout=out,
        stderr=err,
        sleep=lambda _s: None,
    )
    return code, out.getvalue(), err.getvalue()


def failures(junit: Path) -> dict[str, str]:
    """``classname/name`` → failure message, for every failing testcase."""
    root = ET.parse(junit).getroot()
    return {
        f"{case.get('classname')}/{case.get('name')}": case.find("failure").get("message", "")
        for case in root.iter("testcase")
        if case.find("failure") is not None
    }


def test_a_model_against_itself_passes_with_a_clean_report(
    client: Any, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    summary = tmp_path / "step-summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    before, after = submit(client, tiny_model_dir), submit(client, tiny_model_dir)
    finish(client, before, wrong={"q3"})
    finish(client, after, wrong={"q3"})
    code, out, err = gate(client, tmp_path, before=before, after=after)
    assert code == 0, err
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith("forgetguard gate: PASS: no forgetting rule failed; accuracy 0.950 → 0.950")
    )
    assert "geography" in out and "0.900 → 0.900" in out and "verdict: PASS" in out
    root = ET.parse(tmp_path / "junit.xml").getroot()
    names = {c.get("name") for c in root.iter("testcase")}
    assert {"overall", "geography", "science", "Lists three countries", "Answers briefly"} <= names
    assert root.get("failures") == "0" and failures(tmp_path / "junit.xml") == {}
    assert (tmp_path / "gate.md").read_text().startswith("## forgetguard gate: ✅ PASS")
    assert summary.read_text().startswith("earlier step\n## forgetguard gate: ✅ PASS")


def test_a_collapsed_candidate_exits_1_with_failures_only_where_the_drop_is(
    client: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    before, after = submit(client, tiny_model_dir), submit(client, tiny_model_dir)
    finish(client, before)
    # science collapses, geography is untouched; the critical check breaks, the low one holds.
    finish(client, after, wrong={f"q{i}" for i in range(10, 20)}, failing_checks={"lists"})
    code, out, err = gate(client, tmp_path, before=before, after=after)
    assert code == 1
    line = err.strip().splitlines()[-1]
    # The server's headline: the first reason, and how many more there are.
    assert line.startswith("forgetguard gate: FAIL: accuracy dropped 0.500")
    assert line.endswith("(and 1 more reason)")
    assert "critical check 'Lists three countries'" in out
    assert "verdict: FAIL" in out
    failed = failures(tmp_path / "junit.xml")
    # The science drop is reported (no --max-category-drop), so it is not a <failure>.
    assert set(failed) == {
        "forgetguard.accuracy/overall",
        "forgetguard.checklist.gate-checks/Lists three countries",
    }
    assert failed["forgetguard.checklist.gate-checks/Lists three countries"] == (
        "critical check 'Lists three countries' passed before and fails after "
        "(1 item; low evidence)"
    )
    science = next(
        c
        for c in ET.parse(tmp_path / "junit.xml").getroot().iter("testcase")
        if c.get("name") == "science"
    )
    assert "reported, not gated: category 'science' dropped 1.000" in science.findtext(
        "system-out", ""
    )
    markdown = (tmp_path / "gate.md").read_text()
    assert "❌ FAIL" in markdown and "10 forgotten items" in markdown


def test_max_category_drop_and_mode_reach_the_comparison(
    client: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    before, after = submit(client, tiny_model_dir), submit(client, tiny_model_dir)
    finish(client, before)
    finish(client, after, wrong={"q10", "q11"})  # overall drop 0.1, science 0.2
    assert gate(client, tmp_path, before=before, after=after)[0] == 0
    code, _, err = gate(client, tmp_path, before=before, after=after, max_category_drop=0.15)
    assert code == 1 and "category 'science' dropped 0.200" in err
    code, _, err = gate(client, tmp_path, before=before, after=after, mode="noninferiority")
    assert code == 1 and "non-inferiority cannot be shown at n = 20" in err


def test_max_kl_reaches_the_comparison_query_only_when_set() -> None:
    ids = {"before": "a", "after": "b"}
    assert "max_kl" not in compare_params(GateOptions(), ids)
    assert compare_params(GateOptions(rules=CompareRules(max_kl=0.05)), ids)["max_kl"] == 0.05


@pytest.mark.parametrize("cli_module", ["app.cli", "forgetguard.cli"])
def test_the_cli_passes_max_kl_to_the_gate(
    monkeypatch: pytest.MonkeyPatch, cli_module: str
) -> None:
    import importlib

    from typer.testing import CliRunner

    import forgetguard.gate as gate_package

    cli = importlib.import_module(cli_module).app
    seen: list[GateOptions] = []
    monkeypatch.setattr(gate_package, "run_gate", lambda options, **_: seen.append(options) or 0)
    result = CliRunner().invoke(
        cli, ["gate", "--server", "http://x", "--before", "a", "--after", "b", "--max-kl", "0.2"]
    )
    assert result.exit_code == 0, result.output
    assert seen[0].rules.max_kl == 0.2 and seen[0].rules.changed() == {"max_kl": 0.2}


def test_a_failed_evaluation_exits_2_with_its_reason(
    client: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    before, after = submit(client, tiny_model_dir), submit(client, tiny_model_dir)
    finish(client, before)
    finish(client, after, status="failed", error="CUDA out of memory")
    code, _, err = gate(client, tmp_path, before=before, after=after)
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        f"forgetguard gate: ERROR: after evaluation {after} failed: CUDA out of memory"
    )
    root = ET.parse(tmp_path / "junit.xml").getroot()
    assert root.get("errors") == "1" and root.find(".//error") is not None


def test_incomparable_runs_exit_2_naming_the_difference(
    client: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    before = submit(client, tiny_model_dir)
    response = client.post(
        "/evaluations",
        json={
            "model": {"path": str(tiny_model_dir)},
            "suites": [QA, CHECKS],
            "cache": False,
            "generation": {"max_new_tokens": 9},
        },
    )
    after = response.json()["id"]
    finish(client, before)
    finish(client, after)
    code, _, err = gate(client, tmp_path, before=before, after=after)
    assert code == 2 and "max_new_tokens 50 before, 9 after" in err


def test_submission_waits_times_out_and_a_retry_queues_nothing_new(
    client: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    options = {
        "base_model": str(tiny_model_dir),
        "candidate": str(tiny_model_dir),
        "suites": [str(_suite_file(tmp_path))],
        "timeout": 1.5,
    }
    code, _, err = gate(client, tmp_path, **options)
    assert code == 2 and "timed out after 1.5 s waiting for evaluations" in err
    with client.app.state.sessionmaker() as session:
        ids = list(session.execute(select(Evaluation.id).order_by(Evaluation.created_at)).scalars())
    assert len(ids) == 2  # base and candidate differ only in label: both queued once
    code, _, _ = gate(client, tmp_path, **options)  # the CI step is retried
    with client.app.state.sessionmaker() as session:
        assert session.execute(select(func.count()).select_from(Evaluation)).scalar_one() == 2
    # Once a worker has finished both, the retried step passes on the same evaluations.
    for evaluation_id in ids:
        finish(client, evaluation_id, checks=False)
    code, _, err = gate(client, tmp_path, **options)
    assert code == 0, err


def _suite_file(tmp_path: Path) -> Path:
    import json

    path = tmp_path / "suite.json"
    path.write_text(json.dumps(QA))
    return path


def test_usage_errors_exit_2(client: Any, tmp_path: Path) -> None:
    code, _, err = gate(client, tmp_path, before="ev_a")
    assert code == 2 and "--before and --after go together" in err
    code, _, err = gate(client, tmp_path, base_model="models/x")
    assert code == 2 and "--candidate" in err
    code, _, err = gate(client, tmp_path, before="ev_a", after="ev_b")
    assert code == 2 and "404" in err and "ev_a" in err


def test_an_unreachable_server_exits_2_quickly(tmp_path: Path) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "gate",
            "--server",
            f"http://127.0.0.1:{free_port()}",
            "--before",
            "ev_a",
            "--after",
            "ev_b",
            "--junit",
            str(tmp_path / "junit.xml"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "forgetguard gate: ERROR: cannot reach the forgetguard server at http://127.0.0.1:"
        )
    )
    assert time.monotonic() - started < 20
    ET.parse(tmp_path / "junit.xml")  # an error report CI can show


def test_transient_502s_are_retried_and_401_is_explained(tmp_path: Path) -> None:
    calls = {"n": 0}

    def flaky(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if request.url.path == "/healthz" and calls["n"] < 3:
            return httpx.Response(502)
        return httpx.Response(401, json={"title": "Unauthorized", "detail": "missing API key"})

    client = httpx.Client(transport=httpx.MockTransport(flaky), base_url="http://gate.test")
    code, _, err = gate(client, tmp_path, before="ev_a", after="ev_b")
    assert code == 2 and calls["n"] == 3
    assert "refused the request (401): missing API key" in err and "FORGETGUARD_API_KEY" in err


def test_idempotency_keys_follow_inputs_files_and_the_ci_run(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    body = {"model": {"path": str(model), "adapter_path": None}, "label": "gate: base"}
    key = idempotency_key(body, environ={})
    assert key.startswith("fg-") and key == idempotency_key(body, environ={})
    assert key != idempotency_key({**body, "label": "other"}, environ={})
    assert key != idempotency_key(body, environ={"GITHUB_RUN_ID": "7"})
    (model / "config.json").write_text('{"changed": true}')  # weights retrained in place
    assert key != idempotency_key(body, environ={})
    remote = {"model": {"path": "/srv/models/not-here"}}
    assert idempotency_key(remote, environ={"CI_PIPELINE_ID": "1"}) == idempotency_key(
        remote, environ={"CI_PIPELINE_ID": "1"}
    )


def test_a_server_restart_while_waiting_is_ridden_out(tmp_path: Path) -> None:
    polls = {"n": 0}
    comparison = {
        "before": "ev_a",
        "after": "ev_a",
        "threshold": 0.1,
        "mode": "threshold",
        "verdict": "pass",
        "reasons": [],
        "statistics": None,
        "checklist": None,
        "drift": None,
        "flips": {"forgotten": [], "learned": []},
        "overall_accuracy_before": None,
        "same_run": True,
    }

    def restarting(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/evaluations/ev_a":
            polls["n"] += 1
            if 3 <= polls["n"] <= 6:  # every retry of one poll fails: the server is down
                raise httpx.ConnectError("connection refused", request=request)
            status = "running" if polls["n"] < 10 else "succeeded"
            return httpx.Response(
                200,
                json={
                    "id": "ev_a",
                    "status": status,
                    "error": None,
                    "progress": {"done": 1, "total": 2, "stage": "qa"},
                },
            )
        if request.url.path == "/compare":
            return httpx.Response(200, json=comparison)
        return httpx.Response(200, json={"status": "ok"})

    client = httpx.Client(transport=httpx.MockTransport(restarting), base_url="http://gate.test")
    code, _, err = gate(client, tmp_path, before="ev_a", after="ev_a")
    assert code == 0, err
    assert polls["n"] >= 10
