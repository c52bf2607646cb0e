"""The GitHub Action: action.yml and the docs' workflow that uses it pass actionlint, and the
example passes only inputs the action declares."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
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


# --- the gate step's own script, run by bash as the runner runs it, with a stand-in gate


def _gate_step(
    tmp_path: Path, *, args: str = "", report_dir: str = "forgetguard-report", code: int = 0
) -> tuple[subprocess.CompletedProcess[str], dict[str, str], list[str] | None]:
    """Run the action's gate step; returns the process, its outputs and the arguments the
    stand-in ``forgetguard`` received (None when it was never called)."""
    workspace = tmp_path / "workspace"
    workspace.mkdir(exist_ok=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    called = tmp_path / "called.txt"
    called.unlink(missing_ok=True)
    fake = bin_dir / "forgetguard"
    fake.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {called}\nexit {code}\n')
    fake.chmod(0o755)
    output = tmp_path / "github-output"
    output.write_text("")
    step = next(s for s in ACTION["runs"]["steps"] if s.get("id") == "gate")
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "GITHUB_WORKSPACE": str(workspace),
        "GITHUB_OUTPUT": str(output),
        "FORGETGUARD_URL": "https://forgetguard.internal",
        "FORGETGUARD_API_KEY": "secret",
        "FG_BASE_MODEL": "/models/base",
        "FG_CANDIDATE": "/models/candidate",
        "FG_ADAPTER": "",
        "FG_BEFORE": "",
        "FG_AFTER": "",
        "FG_SUITES": "general-qa",
        "FG_THRESHOLD": "0.10",
        "FG_ARGS": args,
        "FG_REPORTS": report_dir,
    }
    # GitHub runs `shell: bash` steps as `bash --noprofile --norc -eo pipefail {0}`.
    script = tmp_path / "step.sh"
    script.write_text(step["run"])
    result = subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)],
        cwd=workspace,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    outputs = dict(line.split("=", 1) for line in output.read_text().splitlines() if "=" in line)
    received = called.read_text().splitlines() if called.exists() else None
    return result, outputs, received


def test_the_gate_step_passes_its_inputs_and_free_args_and_reports_the_verdict(
    tmp_path: Path,
) -> None:
    result, outputs, received = _gate_step(
        tmp_path, args="--mode noninferiority --max-category-drop 0.2", code=1
    )
    assert result.returncode == 0, result.stderr
    assert outputs["exit-code"] == "1" and outputs["verdict"] == "fail"
    reports = str((tmp_path / "workspace" / "forgetguard-report").resolve())
    assert outputs["report-dir"] == reports
    assert received is not None
    assert received[:2] == ["gate", "--server"] and received[2] == "https://forgetguard.internal"
    assert f"{reports}/junit.xml" in received and "--base-model" in received
    assert received[-4:] == ["--mode", "noninferiority", "--max-category-drop", "0.2"]


@pytest.mark.parametrize(
    "args",
    [
        "--server https://elsewhere.example",
        "--mode noninferiority --server=https://elsewhere.example",
        "--junit /home/runner/.ssh/id_rsa",
        "--markdown=/tmp/x.md",
        "--threshold 0.9",
        "--base-model /models/other",
        "--suite my-suite",
    ],
)
def test_args_may_not_override_what_the_action_sets(tmp_path: Path, args: str) -> None:
    result, outputs, received = _gate_step(tmp_path, args=args)
    option = next(a for a in args.split() if a.startswith("--") and a != "--mode").split("=")[0]
    assert result.returncode == 2
    assert received is None  # the gate never ran, so the key went nowhere
    assert f"args may not set {option}: the action sets it from its own input" in result.stdout
    assert result.stdout.startswith("::error title=forgetguard gate::")
    assert outputs["exit-code"] == "2" and outputs["verdict"] == "error"


@pytest.mark.parametrize("report_dir", ["/etc", "../outside", ".", "link-out"])
def test_report_dir_is_confined_to_the_workspace(tmp_path: Path, report_dir: str) -> None:
    (tmp_path / "workspace").mkdir()
    (tmp_path / "workspace" / "link-out").symlink_to("/etc")  # inside by name, outside in fact
    result, outputs, received = _gate_step(tmp_path, report_dir=report_dir)
    assert result.returncode == 2 and received is None
    assert f"report-dir '{report_dir}' is not a folder inside the workspace" in result.stdout
    assert "report-dir" not in outputs


def test_the_reports_are_uploaded_only_from_the_checked_folder() -> None:
    upload = next(s for s in ACTION["runs"]["steps"] if s.get("name") == "Upload the reports")
    assert upload["with"]["path"] == "${{ steps.gate.outputs.report-dir }}"
    assert "steps.gate.outputs.report-dir != ''" in upload["if"]


def test_the_action_installs_only_the_client() -> None:
    installs = [s["run"] for s in ACTION["runs"]["steps"] if "pip install" in s.get("run", "")]
    assert installs == ['python -m pip install --quiet "$GITHUB_ACTION_PATH/client"']
    project = tomllib.loads((REPO / "client" / "pyproject.toml").read_text())["project"]
    assert project["name"] == "forgetguard-client"
    needs = " ".join(project["dependencies"])
    for server_side in ("fastapi", "sqlalchemy", "torch", "uvicorn", "alembic"):
        assert server_side not in needs
