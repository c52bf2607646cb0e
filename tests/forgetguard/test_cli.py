"""The client's commands: ``gate --help`` (whole option names without a terminal, the rule book's
rules as options), and ``evaluate``, ``compare``, ``finetune`` and ``status`` against a real
server, with the gate's exit codes, from the client's CLI and the server's ``forgetguard``."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from app.main import create_app
from forgetguard.rules import CompareRules
from tests.conftest import REPO
from tests.forgetguard.fake_server import Answer, fake_forgetguard, healthy_routes
from tests.forgetguard.gate.test_run import QA, finish, submit
from tests.ui.live import serve

CLIS = ["forgetguard.cli", "app.cli"]


def _help(module: str, *command: str, code: str = "") -> str:
    """``python -m MODULE COMMAND --help`` with stdout a pipe and no COLUMNS: as in a CI log."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "TERMINAL_WIDTH")}
    if code:
        program = code + f"\nimport sys\nsys.argv = ['forgetguard', *{list(command)!r}, '--help']\n"
        program += f"from {module} import main\nmain()\n"
        args = [sys.executable, "-c", program]
    else:
        args = [sys.executable, "-m", module, *command, "--help"]
    result = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("module", CLIS)
def test_gate_help_without_a_terminal_shows_every_option_whole(module: str) -> None:
    text = _help(module, "gate")
    command = get_command(importlib.import_module(module).app).commands["gate"]  # type: ignore[attr-defined]
    names = [opt for param in command.params for opt in param.opts if opt.startswith("--")]
    assert "--max-category-drop" in names and len(names) > 25
    for name in names:
        assert name in text.split(), name
    assert "…" not in text and "╭" not in text  # neither cut nor boxed


def test_every_rule_of_the_rule_book_is_a_gate_option_with_its_description() -> None:
    text = " ".join(_help("forgetguard.cli", "gate").split())
    for name, field in CompareRules.model_fields.items():
        assert f"--{name.replace('_', '-')}" in text, name
        assert " ".join((field.description or "").split())[:40] in text, name


DUMMY_RULE = """
from pydantic import Field
import forgetguard.rules as rules

class WithDummy(rules.CompareRules):
    dummy_rule: float | None = Field(None, ge=0, description="A dummy rule added for a test.")

rules.CompareRules = WithDummy
"""


@pytest.mark.parametrize("module", CLIS)
def test_a_rule_added_to_the_rule_book_is_a_gate_option(module: str) -> None:
    for command in ("gate", "compare"):
        text = " ".join(_help(module, command, code=DUMMY_RULE).split())
        assert "--dummy-rule" in text and "A dummy rule added for a test." in text, command
    # And it reaches the query string, validated by the rule book.
    program = DUMMY_RULE + (
        "from typer.testing import CliRunner\n"
        "import forgetguard.gate as gate\n"
        "from forgetguard.gate import compare_params\n"
        f"from {module} import app\n"
        "seen = []\n"
        "gate.run_gate = lambda options, **_: seen.append(options) or 0\n"
        "args = ['gate', '--before', 'a', '--after', 'b', '--dummy-rule']\n"
        "ok = CliRunner().invoke(app, args + ['0.3'])\n"
        "bad = CliRunner().invoke(app, args + ['-1'])\n"
        "print(ok.exit_code, compare_params(seen[0], {'before': 'a', 'after': 'b'}))\n"
        "print(bad.exit_code, bad.output.strip().splitlines()[-1])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert result.returncode == 0, result.stderr
    ok, bad = result.stdout.strip().splitlines()
    assert ok == "0 {'before': 'a', 'after': 'b', 'dummy_rule': 0.3}"
    assert bad.startswith("2 error: --dummy-rule: Input should be greater than or equal to 0")


# --------------------------------------------------------------------------- the verbs


def _run(module: str, server: str, *args: str) -> Any:
    app = importlib.import_module(module).app
    return CliRunner().invoke(app, list(args), env={"FORGETGUARD_URL": server})


@pytest.mark.parametrize("module", CLIS)
def test_evaluate_status_and_compare_with_the_gate_s_exit_codes(
    module: str, client: Any, settings: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    suite = tmp_path / "qa.json"
    suite.write_text(json.dumps(QA))
    with serve(create_app(settings)) as server:
        queued = _run(module, server, "evaluate", str(tiny_model_dir), "--suite", str(suite))
        assert queued.exit_code == 0, queued.output
        evaluation_id = queued.stdout.strip()
        assert evaluation_id.startswith("ev_") and "(queued)" in queued.stderr
        assert client.get(f"/evaluations/{evaluation_id}").json()["label"] is None

        status = _run(module, server, "status", evaluation_id)
        assert status.exit_code == 0 and status.stdout.strip() == f"{evaluation_id}: queued 0/20"

        before, after, broken = (submit(client, tiny_model_dir) for _ in range(3))
        finish(client, before)
        finish(client, after, wrong={f"q{i}" for i in range(10, 20)})
        finish(client, broken, status="failed", error="CUDA out of memory\n::error::x")

        passed = _run(module, server, "compare", before, before)
        assert passed.exit_code == 0, passed.output
        assert "verdict: PASS" in passed.stdout
        assert passed.stderr.strip().startswith("forgetguard compare: PASS")
        forgot = _run(module, server, "compare", before, after)
        assert forgot.exit_code == 1 and "accuracy dropped 0.500" in forgot.stderr
        looser = _run(module, server, "compare", before, after, "--threshold", "0.6", "--json")
        assert looser.exit_code == 0 and json.loads(looser.stdout)["threshold"] == 0.6
        unfinished = _run(module, server, "compare", before, evaluation_id)
        assert unfinished.exit_code == 2 and unfinished.stderr.startswith("error: GET /compare")

        failed = _run(module, server, "status", broken, "--json")
        assert failed.exit_code == 2 and json.loads(failed.stdout)["status"] == "failed"
        assert failed.stderr.strip() == f"{broken} failed: CUDA out of memory\\n::error::x"
        waited = _run(module, server, "status", after, "--wait")
        assert waited.exit_code == 0 and waited.stdout.startswith(f"{after}: succeeded")

        missing = _run(module, server, "status", "ev_nope")
        assert missing.exit_code == 2 and "404" in missing.stderr


@pytest.mark.parametrize("module", CLIS)
def test_finetune_queues_a_job_and_status_follows_it(
    module: str, client: Any, settings: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    request = tmp_path / "job.json"
    request.write_text(
        json.dumps(
            {
                "base_model": {"path": str(tiny_model_dir)},
                "dataset": {"examples": [{"text": "Q: 1+1?\nA: 2"}]},
                "evaluation": {"suites": [QA]},
            }
        )
    )
    with serve(create_app(settings)) as server:
        queued = _run(module, server, "finetune", str(request), "--method", "full")
        assert queued.exit_code == 0, queued.output
        job_id = queued.stdout.strip()
        assert job_id.startswith("ft_") and f"fine-tune job {job_id} (queued)" in queued.stderr
        job = client.get(f"/finetune-jobs/{job_id}").json()
        assert job["method"] == "full" and job["base_model"]["path"] == str(tiny_model_dir)
        status = _run(module, server, "status", job_id)
        assert status.exit_code == 0 and status.stdout.startswith(f"{job_id}: queued")

        incomplete = _run(module, server, "finetune", "--base-model", str(tiny_model_dir))
        assert incomplete.exit_code == 2
        assert incomplete.stderr.strip() == (
            "error: the request needs --dataset (or a request file with them)"
        )
        refused = _run(module, server, "finetune", "--base-model", "/elsewhere", "--dataset", "x")
        assert refused.exit_code == 2 and "failed (4" in refused.stderr


def test_a_verb_against_a_malformed_server_is_exit_2_with_one_line() -> None:
    routes = healthy_routes(ev_a=Answer(200, "<html>Sign in</html>"))
    with fake_forgetguard(routes) as server:
        result = _run("forgetguard.cli", server, "status", "ev_a")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: GET /evaluations/ev_a: the server's answer is not a forgetguard answer: "
        "status 200 with a body that is not JSON (text/html)"
    ]
