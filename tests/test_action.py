"""The GitHub Action: action.yml and the docs' workflow that uses it pass actionlint, and the
example passes only inputs the action declares."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
ACTION = yaml.safe_load((REPO / "action.yml").read_text())
DOCS = (REPO / "docs" / "ci.md").read_text()


def _example() -> str:
    section = DOCS[DOCS.index("## GitHub Actions") :]
    return re.search(r"```yaml\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]


def _actionlint() -> str:
    found = shutil.which("actionlint") or str(Path(sys.executable).parent / "actionlint")
    if not Path(found).exists():
        pytest.skip("actionlint is not installed (pip install -e '.[dev]')")
    return found


def test_the_docs_example_passes_only_declared_inputs() -> None:
    workflow = yaml.safe_load(_example())
    steps = workflow["jobs"]["gate"]["steps"]
    uses = [s for s in steps if str(s.get("uses", "")).endswith("/forgetguard@v1")]
    assert len(uses) == 1
    given = set(uses[0]["with"])
    declared = set(ACTION["inputs"])
    assert given <= declared, given - declared
    required = {name for name, spec in ACTION["inputs"].items() if spec.get("required")}
    assert required <= given
    assert set(ACTION["outputs"]) == {"verdict", "exit-code"}
    # Every input the docs list exists, and the action's input list is the documented one.
    listed = set(re.findall(r"`([a-z-]+)`", DOCS[DOCS.index("Inputs:") :].split("\n\n")[0]))
    assert declared <= listed


def test_action_and_example_workflow_pass_actionlint(tmp_path: Path) -> None:
    linter = _actionlint()
    shutil.copy(REPO / "action.yml", tmp_path / "action.yml")
    workflows = tmp_path / ".github" / "workflows"
    workflows.mkdir(parents=True)
    # Point the example at the local copy so actionlint checks its inputs against action.yml.
    example = _example().replace("your-org/forgetguard@v1", "./")
    (workflows / "gate.yml").write_text(
        example.replace("    steps:\n", "    steps:\n      - uses: actions/checkout@v5\n", 1)
    )
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    result = subprocess.run([linter, "-no-color"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # And it does find problems: an undeclared input is reported.
    (workflows / "gate.yml").write_text(
        (workflows / "gate.yml").read_text().replace("threshold:", "no-such-input:")
    )
    bad = subprocess.run([linter, "-no-color"], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode != 0 and "no-such-input" in bad.stdout


def test_the_action_calls_gate_options_that_exist() -> None:
    script = next(s["run"] for s in ACTION["runs"]["steps"] if s.get("id") == "gate")
    options = set(re.findall(r"(--[a-z-]+)", script))
    help_text = subprocess.run(
        [sys.executable, "-m", "app.cli", "gate", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "TERM": "dumb"},
        cwd=REPO,
    ).stdout
    for option in options:
        assert option in help_text, option
