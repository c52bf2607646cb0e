"""A command's stdout carries only its result, whatever its libraries and children print."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BODY = """
import logging, subprocess, sys
import typer
from app.cli import stdout_for_results_only

with stdout_for_results_only():
    # What DeepSpeed does on import: a handler bound to the stdout of that moment.
    chatty = logging.getLogger("chatty")
    chatty.addHandler(logging.StreamHandler(stream=sys.stdout))
    chatty.warning("library warning")
    print("library print")
    subprocess.run([sys.executable, "-c", "print('child process')"], check=True)
chatty.warning("library warning, later")
typer.echo("the result")
"""


def test_library_logs_prints_and_child_output_go_to_stderr_and_the_result_to_stdout() -> None:
    result = subprocess.run(
        [sys.executable, "-c", BODY], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "the result\n"
    assert result.stderr.splitlines() == [
        "library warning",
        "library print",
        "child process",
        "library warning, later",
    ]
