"""SIGTERM to a worker: stop claiming, give the job back at a batch boundary, exit 0, in bounded
time, even when the current batch never returns."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select

from app.core.config import Settings
from app.core.database import make_engine, session_factory
from app.core.tables import Claim, Evaluation, EvaluationItem, Worker
from app.main import create_app
from tests.conftest import REPO, qa_suite, settings_env, wait_for
from workers.context import HOLD_AT

pytestmark = pytest.mark.slow

# Worker processes import torch: seconds each, more on a busy machine.
STARTUP_TIMEOUT = 120.0

# A worker whose evaluation is stuck inside one batch that never returns and never checks the
# stop flag: the hard bound must still release the job and end the process.
STUCK_WORKER = """
import sys, time
import workers.main as worker_main

def stuck(ctx, models):
    ctx.set_stage("stuck in a batch")
    while True:
        time.sleep(3600)

worker_main._job_runners = lambda: {"evaluation": stuck}
from app.cli import main
sys.argv = ["forgetguard", "worker", "--device", "cpu", "--kinds", "evaluation"]
main()
"""


def spawn(
    settings: Settings, log: Path, *, script: str | None = None, **env: str
) -> subprocess.Popen[bytes]:
    """A ``forgetguard worker`` on the CPU (or ``script`` run with ``python -c``)."""
    args = (
        ["-c", script]
        if script
        else ["-m", "app.cli", "worker", "--device", "cpu", "--kinds", "evaluation"]
    )
    environment = settings_env(settings)
    environment.update(env)
    return subprocess.Popen(
        [sys.executable, *args],
        env=environment,
        cwd=REPO,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    """End a worker this test started, if it is still running."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    engine = make_engine(settings.database_url)
    yield engine
    engine.dispose()


def submit(
    settings: Settings, model_dir: Path, suites: list[dict[str, Any]], max_new_tokens: int = 16
) -> str:
    """Queue one evaluation through the API; returns its id."""
    with TestClient(create_app(settings)) as client:
        response = client.post(
            "/evaluations",
            json={
                "model": {"path": str(model_dir)},
                "suites": suites,
                "prompt_format": "plain",
                "generation": {"max_new_tokens": max_new_tokens},
                "cache": False,
            },
        )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def evaluation(engine: Engine, evaluation_id: str) -> Evaluation:
    with session_factory(engine)() as session:
        row = session.get(Evaluation, evaluation_id)
        assert row is not None
        return row


def claims(engine: Engine, job_id: str) -> list[Claim]:
    with session_factory(engine)() as session:
        return list(
            session.execute(
                select(Claim).where(Claim.job_id == job_id).order_by(Claim.claimed_at)
            ).scalars()
        )


def item_count(engine: Engine, evaluation_id: str) -> int:
    with session_factory(engine)() as session:
        return len(
            session.execute(
                select(EvaluationItem.id).where(EvaluationItem.evaluation_id == evaluation_id)
            ).all()
        )


def test_sigterm_releases_the_busy_job_and_another_worker_completes_it(
    settings: Settings, engine: Engine, tiny_model_dir: Path, tmp_path: Path
) -> None:
    grace = 30.0
    job_id = submit(settings, tiny_model_dir, [qa_suite("long", 240)], max_new_tokens=48)
    # The first worker holds once 8 items are stored (a hook, not a timer): the signal reaches
    # it mid-evaluation on any machine load.
    first = spawn(
        settings,
        tmp_path / "first.log",
        FORGETGUARD_SHUTDOWN_GRACE_SECONDS=str(grace),
        **{HOLD_AT: "items:8"},
    )
    second: subprocess.Popen[bytes] | None = None
    try:
        wait_for(
            lambda: evaluation(engine, job_id).progress.get("done", 0) >= 8,
            STARTUP_TIMEOUT,
            what="the first worker to store its first batch",
        )
        holder = evaluation(engine, job_id).worker_id
        signalled = time.monotonic()
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=grace + 15) == 0
        took = time.monotonic() - signalled
        assert took < grace + 15

        row = evaluation(engine, job_id)
        # Stopped at the next batch boundary: long before 240 items were done.
        assert row.status == "queued" and row.worker_id is None
        assert row.attempts == 0  # a release does not use up an attempt
        stored = item_count(engine, job_id)
        assert 8 <= stored < 240
        (released,) = claims(engine, job_id)
        assert released.worker_id == holder and released.released_at is not None
        with session_factory(engine)() as session:  # it deregistered on the way out
            assert session.get(Worker, holder) is None

        second = spawn(settings, tmp_path / "second.log")
        wait_for(
            lambda: evaluation(engine, job_id).status == "succeeded",
            STARTUP_TIMEOUT,
            what="the second worker to finish the released evaluation",
        )
    finally:
        stop(first)
        if second is not None:
            stop(second)

    assert item_count(engine, job_id) == 240  # resumed, nothing done twice
    before, after = claims(engine, job_id)
    assert after.worker_id != before.worker_id
    assert before.released_at is not None and after.claimed_at >= before.released_at
    log = (tmp_path / "second.log").read_text()
    todo = re.search(r"long, (\d+) of 240 items to do", log)
    assert todo is not None and int(todo.group(1)) == 240 - stored, log[-2000:]


@pytest.mark.parametrize("how", ["grace runs out", "second signal"])
def test_sigterm_is_bounded_even_when_the_batch_never_returns(
    how: str, settings: Settings, engine: Engine, tiny_model_dir: Path, tmp_path: Path
) -> None:
    grace = 2.0 if how == "grace runs out" else 600.0
    job_id = submit(settings, tiny_model_dir, [qa_suite("stuck", 4)])
    worker = spawn(
        settings,
        tmp_path / "stuck.log",
        script=STUCK_WORKER,
        FORGETGUARD_SHUTDOWN_GRACE_SECONDS=str(grace),
    )
    try:
        wait_for(
            lambda: evaluation(engine, job_id).progress.get("stage") == "stuck in a batch",
            STARTUP_TIMEOUT,
            what="the worker to claim the job and get stuck",
        )
        signalled = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        if how == "second signal":
            wait_for(
                lambda: "finishing the current batch" in (tmp_path / "stuck.log").read_text(),
                30,
                what="the first signal to be taken",
            )
            worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0
        took = time.monotonic() - signalled
    finally:
        stop(worker)
    log = (tmp_path / "stuck.log").read_text()
    assert took < min(grace, 30) + 20, log[-2000:]
    row = evaluation(engine, job_id)
    assert row.status == "queued" and row.worker_id is None and row.attempts == 0, log[-2000:]
    (claim,) = claims(engine, job_id)
    assert claim.released_at is not None
    assert "releasing evaluation" in log and "exiting" in log


def test_idle_worker_exits_at_once_on_sigterm(
    settings: Settings, engine: Engine, tmp_path: Path
) -> None:
    worker = spawn(settings, tmp_path / "idle.log")
    try:

        def registered() -> bool:
            with session_factory(engine)() as session:
                return session.execute(select(Worker.id)).first() is not None

        wait_for(registered, STARTUP_TIMEOUT, what="the worker to register")
        signalled = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
        assert time.monotonic() - signalled < 15
    finally:
        stop(worker)
    assert not registered()  # deregistered: GET /workers no longer lists it
