"""Sharded evaluations on real workers: a 500-item evaluation split into 4 shards over two
worker processes, one of them SIGKILLed mid-shard, gives exactly the item rows and results of
the same evaluation run unsharded; the killed shard resumes alone, from its stored items."""

from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select

from app.core.config import Settings
from app.core.database import make_engine, session_factory
from app.core.tables import Claim, Evaluation
from app.evaluations.shards import positions
from app.main import create_app
from tests.conftest import qa_suite, start_worker, wait_for
from workers.context import HOLD_AT

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT = 180.0  # a worker importing torch on a busy 2-core machine
RUN_TIMEOUT = 600.0
HOLD_AFTER = 8  # items the first worker stores of its shard before it holds (then is killed)
COMPARED = ("item_id", "suite", "prompt", "response", "passed", "score", "category", "details")


def _mc_suite(name: str, size: int) -> dict[str, Any]:
    """A multiple-choice suite (scored by log-likelihood, not generation)."""
    return {
        "name": name,
        "kind": "multiple_choice",
        "items": [
            {
                "id": f"{name}-{i:03d}",
                "question": f"What is {i} plus {i}?",
                "choices": [str(2 * i), str(2 * i + 1), str(i)],
                "gold": 0,
            }
            for i in range(size)
        ],
    }


def _body(model_dir: Path, **extra: Any) -> dict[str, Any]:
    # 500 items: one generated suite and one scored by log-likelihood, so both drivers shard.
    return {
        "model": {"path": str(model_dir)},
        "suites": [qa_suite("shards-qa", 350), _mc_suite("shards-mc", 150)],
        "prompt_format": "plain",
        "generation": {"max_new_tokens": 4},
        "cache": False,
        **extra,
    }


def _items(client: Any, evaluation_id: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 500} | ({"cursor": cursor} if cursor else {})
        page = client.get(f"/evaluations/{evaluation_id}/items", params=params).json()
        rows += [{key: row[key] for key in COMPARED} for row in page["data"]]
        if not page["has_more"]:
            return rows
        cursor = page["next_cursor"]


def _shards(engine: Engine, parent: str) -> list[Evaluation]:
    with session_factory(engine)() as session:
        return list(
            session.scalars(
                select(Evaluation)
                .where(Evaluation.shard_of == parent)
                .order_by(Evaluation.shard_index)
            )
        )


def _claims(engine: Engine, job_id: str) -> list[Claim]:
    with session_factory(engine)() as session:
        return list(session.scalars(select(Claim).where(Claim.job_id == job_id).order_by(Claim.id)))


def test_four_shards_over_two_workers_equal_the_unsharded_run_and_survive_a_sigkill(
    settings: Settings, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Short leases: the killed worker's shard is back in the queue seconds after the kill.
    fast = settings.model_copy(update={"lease_seconds": 3.0, "heartbeat_seconds": 0.5})
    engine = make_engine(fast.database_url)
    logs = {name: tmp_path / f"worker-{name}.log" for name in ("a", "b")}
    workers = {}
    try:
        with TestClient(create_app(fast)) as client:
            response = client.post("/evaluations", json=_body(tiny_model_dir, shards=4))
            assert response.status_code == 202, response.text
            parent = response.json()["id"]

            # Worker a holds once it stored HOLD_AFTER items of the shard it took (a hook, not
            # a timer), so it is surely mid-shard when it is killed.
            workers["a"] = start_worker(
                fast,
                "--kinds",
                "evaluation",
                "--worker-id",
                "worker-a",
                log=logs["a"],
                env={HOLD_AT: f"items:{HOLD_AFTER}"},
            )

            def held() -> Evaluation | None:
                for shard in _shards(engine, parent):
                    if shard.worker_id == "worker-a" and shard.progress["done"] >= HOLD_AFTER:
                        return shard
                return None

            killed = wait_for(held, STARTUP_TIMEOUT, what="worker a to store its first items")
            stored_by_a = int(killed.progress["done"])  # a holds: nothing more is stored
            workers["b"] = start_worker(
                fast, "--kinds", "evaluation", "--worker-id", "worker-b", log=logs["b"]
            )
            wait_for(
                lambda: any(
                    s.worker_id == "worker-b" and s.progress["done"] > 0
                    for s in _shards(engine, parent)
                ),
                STARTUP_TIMEOUT,
                what="worker b to store items of another shard",
            )
            # Both workers are on shards of the same evaluation at once; a sees it running.
            running = client.get(f"/evaluations/{parent}").json()
            assert running["status"] == "running", running
            assert running["shards"]["total"] == 4
            assert {s["worker_id"] for s in running["shards"]["data"]} >= {
                "worker-a",
                "worker-b",
            }
            workers["a"].send_signal(signal.SIGKILL)
            workers["a"].wait(timeout=30)

            def finished(evaluation_id: str) -> dict[str, Any] | None:
                body: dict[str, Any] = client.get(f"/evaluations/{evaluation_id}").json()
                assert body["status"] not in ("failed", "cancelled"), body
                return body if body["status"] == "succeeded" else None

            sharded = wait_for(
                lambda: finished(parent), RUN_TIMEOUT, what="the sharded evaluation to merge"
            )

            # The same evaluation unsharded (worker b runs it): the reference.
            alone = client.post("/evaluations", json=_body(tiny_model_dir))
            assert alone.status_code == 202, alone.text
            reference = wait_for(
                lambda: finished(alone.json()["id"]), RUN_TIMEOUT, what="the unsharded run"
            )

            sharded_items = _items(client, parent)
            reference_items = _items(client, reference["id"])
            assert len(sharded_items) == 500
            assert sharded_items == reference_items
            # Each shard lists the slice it scored: together, the evaluation's rows, once each.
            by_shard = [_items(client, s["id"]) for s in sharded["shards"]["data"]]
            assert all(by_shard) and sum(map(len, by_shard)) == 500
            listed = {(r["suite"], r["item_id"]) for found in by_shard for r in found}
            assert listed == {(r["suite"], r["item_id"]) for r in sharded_items}
            assert sharded["results"] == reference["results"]
            assert sharded["progress"] == {
                "done": 500,
                "total": 500,
                "stage": "done",
                "percent": 100.0,
                "eta_seconds": 0.0,
            }
            assert sharded["model"]["fingerprint"] == reference["model"]["fingerprint"]
            assert sharded["prompt_format"] == reference["prompt_format"]
            assert {s["status"] for s in sharded["shards"]["data"]} == {"succeeded"}
            assert sharded["shards"]["done"] == 4

            # The merged evaluation is an exact cache source, as an unsharded run is.
            again = client.post("/evaluations", json=_body(tiny_model_dir, cache=True))
            assert again.status_code == 200, again.text
            assert again.json()["cached_from"] in (parent, reference["id"])
    finally:
        for proc in workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in workers.values():
            proc.wait(timeout=60)

    # Only the killed shard ran twice: a second attempt by worker b, claimed after a's
    # lease ran out; the other shards ran once each.
    shards = _shards(engine, parent)
    engine_claims = {s.id: _claims(engine, s.id) for s in shards}
    engine.dispose()
    for shard in shards:
        holders = [c.worker_id for c in engine_claims[shard.id]]
        if shard.id == killed.id:
            assert holders == ["worker-a", "worker-b"] and shard.attempts == 2
            first, second = engine_claims[shard.id]
            assert first.released_at is None  # killed: its lease just ran out
            assert second.claimed_at >= first.lease_expires_at
        else:
            assert len(holders) == 1 and shard.attempts == 1, (shard.shard_index, holders)
    # Worker b resumed the killed shard from its stored items: only the rest of its slice.
    log_b = logs["b"].read_text()
    slice_qa = len(positions([350, 150], index=int(killed.shard_index or 0), count=4)[0])
    todo = re.search(rf"evaluation {killed.id}: shards-qa, (\d+) of 350 items to do", log_b)
    assert todo is not None, log_b[-3000:]
    assert int(todo.group(1)) == slice_qa - stored_by_a


def test_cancelling_a_sharded_evaluation_stops_the_worker_on_its_shard(
    settings: Settings, tiny_model_dir: Path, tmp_path: Path
) -> None:
    engine = make_engine(settings.database_url)
    log = tmp_path / "worker.log"
    worker = None
    try:
        with TestClient(create_app(settings)) as client:
            body = {**_body(tiny_model_dir, shards=2), "suites": [qa_suite("cancel-qa", 64)]}
            response = client.post("/evaluations", json=body)
            assert response.status_code == 202, response.text
            parent = response.json()["id"]
            worker = start_worker(
                settings,
                "--kinds",
                "evaluation",
                "--worker-id",
                "worker-c",
                log=log,
                env={HOLD_AT: f"items:{HOLD_AFTER}"},
            )
            held = wait_for(
                lambda: next(
                    (s for s in _shards(engine, parent) if s.progress["done"] >= HOLD_AFTER),
                    None,
                ),
                STARTUP_TIMEOUT,
                what="the worker to store items of a shard",
            )
            cancelled = client.post(f"/evaluations/{parent}/cancel")
            assert cancelled.status_code == 200, cancelled.text
            assert cancelled.json()["status"] == "cancelled"
            assert {s["status"] for s in cancelled.json()["shards"]["data"]} == {"cancelled"}

            def idle() -> bool:
                listed = client.get("/workers").json()["data"]
                return any(w["id"] == "worker-c" and w["status"] == "idle" for w in listed)

            # The worker notices within a poll, stops without writing more, takes nothing else.
            wait_for(idle, 60, what="the worker to stop its cancelled shard")
            stored = _items(client, parent)
            assert len(stored) == int(held.progress["done"])
            other = next(s for s in _shards(engine, parent) if s.id != held.id)
            assert _claims(engine, other.id) == []
            assert f"evaluation {held.id}: stopped" in log.read_text()
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=60) == 0
        engine.dispose()
