"""Chaos: workers SIGKILLed mid-job and replaced; no evaluation is lost, none is run twice at once.

Short leases (3 s, heartbeat 0.5 s) bring a killed worker's job back quickly. At the end every
evaluation has succeeded with exactly one item row per suite item, and the append-only claims
log proves that no job was ever held by two live leases at once: for each job, every claim
starts after the previous claim ended (its release, or its lease running out).
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select

from app.core.config import Settings
from app.core.database import make_engine, session_factory
from app.core.tables import Claim, Evaluation, EvaluationItem, Worker
from app.jobs.status import FINISHED
from app.main import create_app
from tests.conftest import REPO, qa_suite, settings_env

pytestmark = pytest.mark.slow

EVALUATIONS = 12  # submitted at the start
TOP_UP = 6  # more evaluations, whenever the queue drains before MIN_KILLS kills happened
MAX_EVALUATIONS = 48  # a fast machine tops up at most this far
MIN_KILLS = 2
KILLS = 4  # at most; then the survivors and replacements finish the queue undisturbed
KILL_GAP = (0.3, 1.5)  # seconds between kills, drawn at random; a kill needs a mid-job victim
DEADLINE = 300.0  # the whole run, kills included; generous for a loaded 2-core machine


SUITES = [qa_suite("chaos-a", 16), qa_suite("chaos-b", 12), qa_suite("chaos-c", 8)]
EXPECTED_ITEMS = {(s["name"], item["id"]) for s in SUITES for item in s["items"]}


class Fleet:
    """The worker processes of one test: start, kill, replace, stop."""

    def __init__(self, settings: Settings, logs: Path) -> None:
        self.env = settings_env(settings)
        self.logs = logs
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.started = 0

    def start(self) -> None:
        self.started += 1
        log = (self.logs / f"worker-{self.started}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker", "--device", "cpu", "--kinds", "evaluation"],
            env=self.env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.procs[proc.pid] = proc

    def kill(self, pid: int) -> None:
        proc = self.procs.pop(pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    def alive(self) -> set[int]:
        return {pid for pid, proc in self.procs.items() if proc.poll() is None}

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)


@pytest.fixture
def chaos_settings(settings: Settings) -> Settings:
    """Short leases so a killed worker's job is back in seconds; attempts enough for the kills."""
    return settings.model_copy(
        update={
            "lease_seconds": 3.0,
            "heartbeat_seconds": 0.5,
            "poll_seconds": 0.2,
            "max_attempts": KILLS + 5,
        }
    )


@pytest.fixture
def engine(chaos_settings: Settings) -> Iterator[Engine]:
    engine = make_engine(chaos_settings.database_url)
    yield engine
    engine.dispose()


def mid_job_worker_pids(engine: Engine, live_pids: set[int]) -> list[int]:
    """Pids of our live workers whose job has stored some of its items but not all."""
    with session_factory(engine)() as session:
        rows = session.execute(
            select(Worker.pid, Evaluation.progress)
            .join(Evaluation, Evaluation.id == Worker.current_job_id)
            .where(Worker.status == "busy", Evaluation.status == "running")
        ).all()
    return sorted(
        pid
        for pid, progress in rows
        if pid in live_pids and 0 < progress.get("done", 0) < progress.get("total", 0)
    )


def statuses(engine: Engine, ids: list[str]) -> dict[str, str]:
    with session_factory(engine)() as session:
        rows = session.execute(
            select(Evaluation.id, Evaluation.status).where(Evaluation.id.in_(ids))
        )
        return {row.id: row.status for row in rows}


def overlapping_claims(claims: list[Claim]) -> list[str]:
    """Pairs of claims on one job whose leases overlap in time (should be none)."""
    by_job: dict[str, list[Claim]] = defaultdict(list)
    for claim in claims:
        by_job[claim.job_id].append(claim)
    problems = []
    for job_id, job_claims in by_job.items():
        job_claims.sort(key=lambda c: c.claimed_at)
        for previous, current in zip(job_claims, job_claims[1:], strict=False):
            ended: datetime = previous.lease_expires_at
            if previous.released_at is not None:
                ended = min(ended, previous.released_at)
            if current.claimed_at < ended:
                problems.append(
                    f"{job_id}: {current.worker_id} claimed at {current.claimed_at} while "
                    f"{previous.worker_id}'s claim lasted until {ended}"
                )
    return problems


def test_killed_workers_lose_no_job_and_never_share_one(
    chaos_settings: Settings, engine: Engine, tiny_model_dir: Path, tmp_path: Path
) -> None:
    postgres = chaos_settings.database_url.startswith("postgresql")
    size = 3 if postgres else 2  # SQLite: one writer at a time, two workers are plenty
    rng = random.Random(20240601)

    ids: list[str] = []

    def submit(client: TestClient, count: int) -> None:
        for _ in range(count):
            response = client.post(
                "/evaluations",
                json={
                    "model": {"path": str(tiny_model_dir)},
                    "suites": SUITES,
                    "prompt_format": "plain",
                    "generation": {"max_new_tokens": 32},
                    "label": f"chaos-{len(ids)}",
                    "cache": False,
                },
            )
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])

    fleet = Fleet(chaos_settings, tmp_path)
    kills = 0
    deadline = time.monotonic() + DEADLINE
    with TestClient(create_app(chaos_settings)) as client:
        submit(client, EVALUATIONS)
        try:
            for _ in range(size):
                fleet.start()
            next_kill = time.monotonic() + rng.uniform(*KILL_GAP)
            while time.monotonic() < deadline:
                if all(s in FINISHED for s in statuses(engine, ids).values()):
                    # A fast machine can drain the queue before the kills the test needs.
                    if kills >= MIN_KILLS or len(ids) >= MAX_EVALUATIONS:
                        break
                    submit(client, TOP_UP)
                for pid in {pid for pid, proc in fleet.procs.items() if proc.poll() is not None}:
                    fleet.procs.pop(pid)  # a worker that died on its own is replaced too
                while len(fleet.alive()) < size:
                    fleet.start()
                if kills < KILLS and time.monotonic() >= next_kill:
                    victims = mid_job_worker_pids(engine, fleet.alive())
                    if victims:  # kill mid-job, items half stored: that must lose/repeat nothing
                        fleet.kill(rng.choice(victims))
                        fleet.start()
                        kills += 1
                        next_kill = time.monotonic() + rng.uniform(*KILL_GAP)
                time.sleep(0.05)
        finally:
            fleet.stop()

    final = statuses(engine, ids)
    logs = "\n".join(p.read_text()[-1500:] for p in sorted(tmp_path.glob("worker-*.log")))
    assert all(s == "succeeded" for s in final.values()), f"{final}\n{logs}"
    assert kills >= MIN_KILLS, f"only {kills} kill(s) in {len(ids)} evaluations"

    with session_factory(engine)() as session:
        for evaluation_id in ids:
            rows = session.execute(
                select(EvaluationItem.suite, EvaluationItem.item_id).where(
                    EvaluationItem.evaluation_id == evaluation_id
                )
            ).all()
            assert len(rows) == len(EXPECTED_ITEMS), evaluation_id
            assert {(r.suite, r.item_id) for r in rows} == EXPECTED_ITEMS
            evaluation = session.get(Evaluation, evaluation_id)
            assert evaluation is not None and evaluation.results is not None
            assert {name: r["total"] for name, r in evaluation.results.items()} == {
                "chaos-a": 16,
                "chaos-b": 12,
                "chaos-c": 8,
            }
        claims = list(session.execute(select(Claim).where(Claim.job_id.in_(ids))).scalars())

    assert overlapping_claims(claims) == []
    by_job: dict[str, list[Claim]] = defaultdict(list)
    for claim in sorted(claims, key=lambda c: c.claimed_at):
        by_job[claim.job_id].append(claim)
    # The claim that finished each job was closed by it; the kills left leases that ran out
    # (no release) and were taken over by another worker.
    assert all(job_claims[-1].released_at is not None for job_claims in by_job.values())
    taken_over = [
        job
        for job, job_claims in by_job.items()
        if any(c.released_at is None for c in job_claims[:-1])
    ]
    assert taken_over, "no killed worker's job was ever taken over"
