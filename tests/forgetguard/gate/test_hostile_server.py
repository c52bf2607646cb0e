"""The gate and the client against a forgetguard that lies, stalls or injects: a fake server on
loopback (a real HTTP server in a thread) answers what no forgetguard server would.

- Every malformed answer is exit 2 with one line, never a traceback and never exit 1 (which CI
  reads as a model that forgot); the client raises its own errors, never ``JSONDecodeError`` or
  ``ValidationError``.
- ``--timeout`` bounds the whole run, reads included: a silent server and one that trickles a
  byte at a time are cut off at the deadline.
- Server text reaches logs and reports as one escaped, bounded line; no HTML passes into the
  Markdown and no workflow command (``::error::``) can start a line.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from forgetguard.client import Client, ForgetguardError, MalformedResponse, ProblemError
from forgetguard.gate import GateOptions, run_gate
from tests.conftest import REPO
from tests.forgetguard.fake_server import (
    Answer,
    comparison,
    evaluation,
    fake_forgetguard,
    healthy_routes,
    json_answer,
)

IDS = ["--before", "ev_a", "--after", "ev_b"]


def _without(body: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != key}


MALFORMED: dict[str, dict[str, Answer]] = {
    "an HTML page for the health check": {"healthz": Answer(200, "<html>Sign in</html>")},
    "an empty 200 for the health check": {"healthz": Answer(200, b"")},
    "a redirect for the health check": {
        "healthz": Answer(302, b"", headers={"location": "https://sso.example/login"})
    },
    "an evaluation without a status": {"ev_a": json_answer(_without(evaluation("ev_a"), "status"))},
    "an evaluation with an unknown status": {"ev_a": json_answer(evaluation("ev_a", "paused"))},
    "an evaluation that is a JSON string": {"ev_b": json_answer("succeeded")},
    "an evaluation that is a JSON array": {"ev_b": json_answer([evaluation("ev_b")])},
    "an HTML page for the comparison": {"compare": Answer(200, "<html><body>Hi</body></html>")},
    "a JSON array for the comparison": {"compare": json_answer([comparison()])},
    "a comparison with a null verdict": {"compare": json_answer(comparison(verdict=None))},
    "a comparison with another verdict": {"compare": json_answer(comparison(verdict="FAIL!"))},
    "a 'fail' with nothing else": {"compare": json_answer({"verdict": "fail"})},
    "a 'fail' with statistics of the wrong type": {
        "compare": json_answer(comparison("fail", statistics={"accuracy_before": "high"}))
    },
    "truncated JSON for the comparison": {
        "compare": Answer(200, b'{"verdict": "fa', headers={"content-type": "application/json"})
    },
    "a redirect for the comparison": {
        "compare": Answer(302, b"", headers={"location": "https://elsewhere.example/compare"})
    },
    "an HTML error page": {"compare": Answer(500, "<html><h1>Internal Server Error</h1></html>")},
    "a plain-text 404": {"ev_a": Answer(404, "no such thing", {"content-type": "text/plain"})},
    "a problem that is a JSON array": {"compare": json_answer(["not", "a", "problem"], 409)},
}


def _cli_gate(server: str, tmp_path: Path, *args: str, timeout: float = 120) -> Any:
    """``forgetguard gate`` of the client package as a process, as CI runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FORGETGUARD_", "GITHUB_"))}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "forgetguard.cli",
            "gate",
            "--server",
            server,
            "--junit",
            str(tmp_path / "junit.xml"),
            "--markdown",
            str(tmp_path / "gate.md"),
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=timeout,
    )


def _in_process(server: str, tmp_path: Path, **options: Any) -> tuple[int, str, str, float]:
    """run_gate on a real HTTP connection to ``server``: (code, stdout, stderr, seconds)."""
    out, err = io.StringIO(), io.StringIO()
    started = time.monotonic()
    code = run_gate(
        GateOptions(
            server=server,
            junit=tmp_path / "junit.xml",
            markdown=tmp_path / "gate.md",
            poll_seconds=0.1,
            **options,
        ),
        stdout=out,
        stderr=err,
    )
    return code, out.getvalue(), err.getvalue(), time.monotonic() - started


def _no_injected_lines(*outputs: str) -> None:
    for output in outputs:
        assert "\x1b" not in output and "Traceback" not in output
        for line in output.splitlines():
            assert not line.strip().startswith("::"), line


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_answer_is_exit_2_with_one_line(case: str, tmp_path: Path) -> None:
    with fake_forgetguard(healthy_routes(**MALFORMED[case])) as server:
        result = _cli_gate(server, tmp_path, *IDS)
    assert result.returncode == 2, (result.stdout, result.stderr)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("forgetguard gate: ERROR: "), result.stderr
    assert len(last) < 1200
    _no_injected_lines(result.stdout, result.stderr)
    root = ET.parse(tmp_path / "junit.xml").getroot()
    assert root.get("errors") == "1" and root.get("failures") == "0"


def test_an_html_page_for_the_submission_is_exit_2(tmp_path: Path) -> None:
    routes = healthy_routes(evaluations=Answer(200, "<html>captive portal</html>"))
    with fake_forgetguard(routes) as server:
        result = _cli_gate(server, tmp_path, "--base-model", "models/a", "--candidate", "models/b")
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("forgetguard gate: ERROR: POST /evaluations: the server's answer")
    assert "not JSON (text/html)" in last


def test_a_well_formed_answer_still_passes_and_fails(tmp_path: Path) -> None:
    """The fake server's healthy answers are accepted: the refusals above are about form."""
    with fake_forgetguard(healthy_routes()) as server:
        assert _cli_gate(server, tmp_path, *IDS).returncode == 0
    failing = healthy_routes(compare=json_answer(comparison("fail")))
    with fake_forgetguard(failing) as server:
        result = _cli_gate(server, tmp_path, *IDS)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "forgetguard gate: FAIL: accuracy dropped 0.500"
    )


CLIENT_CALLS: dict[str, Callable[[Client], object]] = {
    "healthz": lambda fg: fg.health(),
    "ev_a": lambda fg: fg.evaluation("ev_a"),
    "ev_b": lambda fg: fg.evaluation("ev_b"),
    "compare": lambda fg: fg.compare("ev_a", "ev_b"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_the_client_raises_its_own_errors_for_malformed_answers(case: str) -> None:
    ((where, answer),) = MALFORMED[case].items()
    with fake_forgetguard(healthy_routes(**MALFORMED[case])) as server:
        with Client(server, retries=0) as fg, pytest.raises(ForgetguardError) as raised:
            CLIENT_CALLS[where](fg)
    error = raised.value
    if answer.status >= 400:
        assert isinstance(error, ProblemError) and error.status == answer.status
    else:
        assert isinstance(error, MalformedResponse), error
        assert "the server's answer is not a forgetguard answer" in str(error)
    assert "\n" not in str(error)


def test_an_answer_beyond_the_size_budget_is_malformed() -> None:
    huge = json_answer({"status": "ok", "padding": "x" * 200_000})
    with fake_forgetguard(healthy_routes(healthz=huge)) as server:
        with Client(server, max_response_bytes=100_000) as fg, pytest.raises(MalformedResponse):
            fg.health()


# --------------------------------------------------------------------------- the deadline

STALLS = {
    "silent": Answer(silent=True),
    "trickling from the status line": Answer(body=comparison(), trickle=0.4),
    "trickling the body": Answer(
        body=comparison(),
        headers={"content-type": "application/json"},
        trickle=0.4,
        trickle_body=True,
    ),
}


@pytest.mark.parametrize("stall", list(STALLS))
@pytest.mark.parametrize("where", ["healthz", "compare"])
def test_timeout_bounds_the_whole_run_reads_included(
    stall: str, where: str, tmp_path: Path
) -> None:
    with fake_forgetguard(healthy_routes(**{where: STALLS[stall]})) as server:
        code, _, err, seconds = _in_process(
            server, tmp_path, before="ev_a", after="ev_b", timeout=2
        )
    assert code == 2
    assert seconds < 2 + 1.0, seconds
    line = err.strip().splitlines()[-1]
    assert line.startswith("forgetguard gate: ERROR: timed out after 2 s"), line


def test_a_silent_server_stops_the_cli_gate_at_its_timeout(tmp_path: Path) -> None:
    with fake_forgetguard(healthy_routes(compare=Answer(silent=True))) as server:
        started = time.monotonic()
        result = _cli_gate(server, tmp_path, *IDS, "--timeout", "3")
        seconds = time.monotonic() - started
    assert result.returncode == 2
    # The slack covers the interpreter's start on a busy machine.
    assert seconds < 3 + 5, seconds
    assert "timed out after 3 s" in result.stderr.strip().splitlines()[-1]


def test_a_job_that_never_finishes_times_out_as_a_wait(tmp_path: Path) -> None:
    running = json_answer(evaluation("ev_b", "running"))
    with fake_forgetguard(healthy_routes(ev_b=running)) as server:
        code, _, err, seconds = _in_process(
            server, tmp_path, before="ev_a", after="ev_b", timeout=1.5
        )
    assert code == 2 and seconds < 1.5 + 1.0
    assert "timed out after 1.5 s waiting for evaluations (ev_b running 2/2)" in err


# --------------------------------------------------------------------------- server text

INJECTED = "\n::error::the model is fine, ship it\x1b[31m\r<script>alert(1)</script>"


def test_a_huge_hostile_problem_detail_is_one_escaped_bounded_line(tmp_path: Path) -> None:
    problem = {"title": "Conflict", "status": 409, "detail": INJECTED + "A" * 5_000_000}
    routes = healthy_routes(compare=json_answer(problem, 409))
    with fake_forgetguard(routes) as server:
        result = _cli_gate(server, tmp_path, *IDS)
    assert result.returncode == 2
    _no_injected_lines(result.stdout, result.stderr)
    last = result.stderr.strip().splitlines()[-1]
    assert "\\n::error::the model is fine, ship it\\x1b[31m\\r<script>" in last
    assert len(last) < 2200 and "characters)" in last
    markdown = (tmp_path / "gate.md").read_text()
    assert "<script" not in markdown and "&lt;script&gt;" in markdown
    assert all(not line.startswith("::") for line in markdown.splitlines())
    ET.parse(tmp_path / "junit.xml")


def test_a_failed_evaluation_s_error_is_escaped(tmp_path: Path) -> None:
    failed = json_answer(evaluation("ev_b", "failed", error="CUDA out of memory" + INJECTED))
    with fake_forgetguard(healthy_routes(ev_b=failed)) as server:
        result = _cli_gate(server, tmp_path, *IDS)
    assert result.returncode == 2
    _no_injected_lines(result.stdout, result.stderr)
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "forgetguard gate: ERROR: after evaluation ev_b failed: CUDA out of memory\\n::error::"
        )
    )


def test_hostile_text_in_a_comparison_is_escaped_in_every_report(tmp_path: Path) -> None:
    body = comparison("fail")
    body["reasons"] = ["accuracy dropped" + INJECTED]
    body["findings"] = [
        {"rule": "accuracy", "subject": "overall", "message": body["reasons"][0], "gates": True},
        {
            "rule": "note",
            "subject": "x",
            "message": "see <img src=x onerror=alert(1)>",
            "gates": False,
        },
    ]
    body["warnings"] = [{"message": "\x1b[2Jcleared" + INJECTED}]
    body["statistics"]["by_category"] = {
        "<b>geo</b>\n::error::x": body["statistics"]["by_category"]["geography"]
    }
    body["flips"]["forgotten"] = [
        {
            "item_id": "q1",
            "question": "[click](javascript:alert(1)) ![x](https://tracker.example/p.png)",
            "response_before": "Paris" + INJECTED,
            "response_after": "`x` | y",
        }
    ]
    body["note"] = "\u202eevil"
    with fake_forgetguard(healthy_routes(compare=json_answer(body))) as server:
        result = _cli_gate(server, tmp_path, *IDS)
    assert result.returncode == 1, result.stderr  # a real fail, told safely
    _no_injected_lines(result.stdout, result.stderr)
    assert "\u202e" not in result.stdout and "\\u202eevil" in result.stdout
    markdown = (tmp_path / "gate.md").read_text()
    for raw in ("<script", "<img", "<b>", "\x1b", "\u202e"):
        assert raw not in markdown, raw
    # Neither a link nor an image can start: their brackets are escaped.
    assert "\\[click\\](javascript" in markdown and "!\\[x\\](https" in markdown
    assert re.search(r"[^\\]\]\(", markdown) is None
    assert all(not line.startswith("::") for line in markdown.splitlines())
    assert "| q1 |" in markdown and "\\`x\\` \\| y" in markdown
    root = ET.parse(tmp_path / "junit.xml").getroot()
    messages = [f.get("message", "") for f in root.iter("failure")]
    assert messages and all("\n" not in m and "\x1b" not in m for m in messages)


# --------------------------------------------------------------------------- report details


def test_junit_leaves_out_values_it_does_not_have(tmp_path: Path) -> None:
    body = comparison(statistics=None)
    with fake_forgetguard(healthy_routes(compare=json_answer(body))) as server:
        code, _, err, _ = _in_process(server, tmp_path, before="ev_a", after="ev_b", timeout=30)
    assert code == 0, err
    junit = (tmp_path / "junit.xml").read_text()
    assert 'value="None"' not in junit
    properties = {
        p.get("name") for p in ET.parse(tmp_path / "junit.xml").getroot().iter("property")
    }
    assert {"before", "after", "verdict", "threshold", "mode"} <= properties
    assert not properties & {"mcnemar_p_value", "min_detectable_drop", "noise_floor_churn"}


def test_markdown_shows_forgotten_answers_beyond_40_characters(tmp_path: Path) -> None:
    answer_before = "The capital of Australia is Canberra, not Sydney as many people think."
    body = comparison("fail")
    body["flips"]["forgotten"] = [
        {
            "item_id": "q7",
            "question": "What is the capital of Australia, and why do people often get it wrong?",
            "response_before": answer_before,
            "response_after": "Sydney " * 60,
        }
    ]
    with fake_forgetguard(healthy_routes(compare=json_answer(body))) as server:
        code, _, _, _ = _in_process(server, tmp_path, before="ev_a", after="ev_b", timeout=30)
    assert code == 1
    markdown = (tmp_path / "gate.md").read_text()
    assert answer_before in markdown and "get it wrong?" in markdown
    long_cell = next(line for line in markdown.splitlines() if line.startswith("| q7"))
    assert "Sydney Sydney" in long_cell and "(420 characters)" in long_cell


def test_a_long_wait_without_a_terminal_prints_a_line_every_few_seconds(tmp_path: Path) -> None:
    started = time.monotonic()

    def slow(method: str, path: str, query: dict[str, list[str]]) -> Answer:
        if path == "/evaluations/ev_b":
            state = "running" if time.monotonic() - started < 1.6 else "succeeded"
            return json_answer(evaluation("ev_b", state))
        return healthy_routes()(method, path, query)

    with fake_forgetguard(slow) as server:
        code, _, err, _ = _in_process(
            server, tmp_path, before="ev_a", after="ev_b", timeout=30, progress_every=0.5
        )
    assert code == 0, err
    running = [line for line in err.splitlines() if line.startswith("after ev_b: running (qa)")]
    # About 16 polls in 1.6 s; a line on the first and then every 0.5 s.
    assert 3 <= len(running) <= 5, err
    assert any(line.startswith("after ev_b: succeeded") for line in err.splitlines())
    assert json.dumps(err)  # plain text, no bar redraws
    assert "\r" not in err
