"""Sharded evaluations in the queue: the evaluation is never claimed, its shards are; the last
shard to succeed merges exactly once (two finishing at the same moment included); a shard that
fails for good fails the evaluation; cancelling the evaluation cancels its shards."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, update

from app.core.config import Settings
from app.core.database import make_engine, session_factory
from app.core.tables import Evaluation
from app.evaluations.shards import BLOCK, disagreement, max_shards, positions, slice_size
from app.jobs import queue
from app.jobs.lifecycle import succeed_sharded
from tests.conftest import qa_suite


def _body(model_dir: Path, shards: Any, size: int = 100) -> dict[str, Any]:
    return {
        "model": {"path": str(model_dir)},
        "suites": [qa_suite("shard-a", size), qa_suite("shard-b", 3)],
        "prompt_format": "plain",
        "generation": {"max_new_tokens": 4},
        "cache": False,
        "shards": shards,
    }


@pytest.fixture
def engine(settings: Settings) -> Any:
    engine = make_engine(settings.database_url)
    yield engine
    engine.dispose()


def _sharded(client: Any, model_dir: Path, shards: int = 4) -> dict[str, Any]:
    response = client.post("/evaluations", json=_body(model_dir, shards))
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    return body


def _row(engine: Engine, evaluation_id: str) -> Evaluation:
    with session_factory(engine)() as session:
        row = session.get(Evaluation, evaluation_id)
        assert row is not None
        return row


def _claim(engine: Engine, worker: str) -> queue.ClaimedJob | None:
    return queue.claim(engine, worker_id=worker, kinds=("evaluation",), lease_seconds=60)


@pytest.mark.parametrize("sizes", [[1], [5, 3], [100, 3], [350, 150], [32, 64, 1, 33]])
def test_shards_deal_whole_blocks_and_every_item_to_exactly_one_shard(sizes: list[int]) -> None:
    for count in range(1, max_shards(sizes) + 1):
        dealt = [positions(sizes, index=i, count=count) for i in range(count)]
        for suite, size in enumerate(sizes):
            owners = [[i for i in range(count) if p in dealt[i][suite]] for p in range(size)]
            assert all(len(found) == 1 for found in owners), (sizes, count)
            # A block (the drivers' pass) never straddles two shards.
            for start in range(0, size, BLOCK):
                assert len({tuple(o) for o in owners[start : start + BLOCK]}) == 1
        assert all(dealt[i] != [[]] * len(sizes) for i in range(count))  # none left idle
        assert sum(slice_size(sizes, index=i, count=count) for i in range(count)) == sum(sizes)


def test_a_sharded_evaluation_queues_its_shards_and_only_they_are_claimed(
    client: Any, engine: Engine, tiny_model_dir: Path
) -> None:
    created = _sharded(client, tiny_model_dir)
    assert created["status"] == "queued" and created["shard_of"] is None
    assert created["progress"] == {
        "done": 0,
        "total": 103,
        "stage": "queued",
        "percent": None,
        "eta_seconds": None,
    }
    shards = created["shards"]
    assert shards["total"] == 4 and shards["done"] == 0
    assert [s["index"] for s in shards["data"]] == [0, 1, 2, 3]
    # Blocks of 32: shard-a's 0-31, 32-63, 64-95, 96-99, then shard-b's 3 items, dealt in turn.
    assert [s["progress"]["total"] for s in shards["data"]] == [35, 32, 32, 4]
    # The list shows the evaluation, its shards only inside it.
    listed = client.get("/evaluations").json()["data"]
    assert [e["id"] for e in listed] == [created["id"]]

    claimed = [_claim(engine, f"w{n}") for n in range(5)]
    jobs = [job for job in claimed if job is not None]
    assert sorted(job.id for job in jobs) == sorted(s["id"] for s in shards["data"])
    assert claimed[4] is None  # the evaluation itself is never a job
    shown = client.get(f"/evaluations/{created['id']}").json()
    assert shown["status"] == "running" and shown["started_at"] is not None
    assert {s["status"] for s in shown["shards"]["data"]} == {"running"}
    assert shown["progress"]["stage"] == "4 of 4 shards running, 0 done"
    one = client.get(f"/evaluations/{jobs[0].id}").json()
    assert one["shard_of"] == created["id"] and one["shards"] is None
    # Each shard runs with the evaluation's settings and never takes or becomes a cache entry.
    parent = _row(engine, created["id"])
    for job in jobs:
        shard = _row(engine, job.id)
        assert (shard.model_path, shard.generation, shard.suites, shard.prompt_format) == (
            parent.model_path,
            parent.generation,
            parent.suites,
            parent.prompt_format,
        )
        assert shard.cache_key is None and not shard.use_cache


@pytest.mark.parametrize(
    ("shards", "where"),
    [(0, "shards"), (65, "shards"), ("4", "shards"), (2.5, "shards"), (6, "shards")],
)
def test_a_bad_shards_value_is_a_422_naming_it(
    client: Any, tiny_model_dir: Path, shards: Any, where: str
) -> None:
    response = client.post("/evaluations", json=_body(tiny_model_dir, shards))
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["errors"][0]["loc"][-1] == where, problem
    assert client.get("/evaluations").json()["data"] == []  # nothing queued


def _finish_all_but(engine: Engine, jobs: list[queue.ClaimedJob], left: int) -> None:
    for job in jobs[:-left]:
        with queue.guarded_write(engine, job, 60) as session:
            assert queue.succeed_shard(session, job) is None


def _finish_together(
    engine: Engine, jobs: list[queue.ClaimedJob]
) -> tuple[list[str | None], list[BaseException]]:
    """Each job's shard succeeds in a thread of its own, all released at the same moment; the
    one told it was last merges. Returns what each was told, and any errors."""
    start = threading.Barrier(len(jobs))
    told: list[str | None] = []
    errors: list[BaseException] = []

    def finish(job: queue.ClaimedJob) -> None:
        try:
            start.wait()
            with queue.guarded_write(engine, job, 60) as session:
                parent = queue.succeed_shard(session, job)
                told.append(parent)
                if parent is not None:
                    succeed_sharded(
                        session, parent, now=queue.db_now(session), results={"merged": 1}
                    )
        except BaseException as exc:  # reported by the test, in its own thread
            errors.append(exc)

    threads = [threading.Thread(target=finish, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return told, errors


def test_the_last_shard_to_succeed_is_told_to_merge_once_even_when_two_finish_together(
    client: Any, engine: Engine, tiny_model_dir: Path
) -> None:
    for _round in range(10):
        created = _sharded(client, tiny_model_dir)
        jobs = [job for job in (_claim(engine, f"w{n}") for n in range(4)) if job is not None]
        assert len(jobs) == 4
        _finish_all_but(engine, jobs, 2)
        told, errors = _finish_together(engine, jobs[2:])
        assert not errors, errors
        assert sorted(told, key=lambda parent: parent is None) == [created["id"], None]
        shown = client.get(f"/evaluations/{created['id']}").json()
        assert shown["status"] == "succeeded" and shown["results"] == {"merged": 1}
        assert shown["shards"]["done"] == 4


def test_a_shard_that_fails_for_good_fails_its_evaluation_and_cancels_the_others(
    client: Any, engine: Engine, tiny_model_dir: Path
) -> None:
    created = _sharded(client, tiny_model_dir)
    jobs = [job for job in (_claim(engine, f"w{n}") for n in range(2)) if job is not None]
    with queue.guarded_write(engine, jobs[1], 60) as session:
        assert queue.succeed_shard(session, jobs[1]) is None
    failing = _row(engine, jobs[0].id)
    assert queue.fail(engine, jobs[0], "CUDA out of memory", retryable=False) == "failed"
    shown = client.get(f"/evaluations/{created['id']}").json()
    assert shown["status"] == "failed" and shown["finished_at"] is not None
    assert shown["error"] == f"shard {failing.shard_index} of 4 failed: CUDA out of memory"
    statuses = {s["id"]: s["status"] for s in shown["shards"]["data"]}
    assert statuses.pop(jobs[0].id) == "failed" and statuses.pop(jobs[1].id) == "succeeded"
    assert set(statuses.values()) == {"cancelled"}  # queued ones are never run now
    assert _claim(engine, "late") is None


def test_a_shard_whose_last_lease_expires_fails_its_evaluation(
    client: Any, engine: Engine, tiny_model_dir: Path
) -> None:
    created = _sharded(client, tiny_model_dir, shards=2)
    job = _claim(engine, "killed")
    assert job is not None
    with session_factory(engine)() as session, session.begin():
        session.execute(
            update(Evaluation)
            .where(Evaluation.id == job.id)
            .values(attempts=Evaluation.max_attempts, lease_expires_at=queue.utcnow())
        )
    other = _claim(engine, "next")  # the claim expires leases first
    assert other is None  # the sibling was cancelled with the failed evaluation
    shown = client.get(f"/evaluations/{created['id']}").json()
    assert shown["status"] == "failed"
    assert shown["error"].startswith(f"shard {_row(engine, job.id).shard_index} of 2 failed: ")
    assert "lease expired" in shown["error"]


def test_cancelling_a_sharded_evaluation_cancels_its_shards_and_their_workers_stop(
    client: Any, engine: Engine, tiny_model_dir: Path
) -> None:
    created = _sharded(client, tiny_model_dir)
    job = _claim(engine, "busy")
    assert job is not None and queue.still_held(engine, job)
    refused = client.post(f"/evaluations/{job.id}/cancel")
    assert refused.status_code == 409 and created["id"] in refused.json()["detail"]
    cancelled = client.post(f"/evaluations/{created['id']}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    body = cancelled.json()
    assert body["status"] == "cancelled"
    assert {s["status"] for s in body["shards"]["data"]} == {"cancelled"}
    assert not queue.still_held(engine, job)  # its worker stops at its next check
    with pytest.raises(queue.LeaseLost):
        with queue.guarded_write(engine, job, 60) as session:
            queue.succeed_shard(session, job)
    assert _claim(engine, "later") is None
    with session_factory(engine)() as session:
        statuses = session.scalars(
            select(Evaluation.status).where(Evaluation.shard_of == created["id"])
        ).all()
    assert set(statuses) == {"cancelled"}


def test_an_evaluation_answered_from_the_cache_queues_no_shards(
    client: Any, engine: Engine, tiny_model_dir: Path
) -> None:
    created = _sharded(client, tiny_model_dir)
    with session_factory(engine)() as session, session.begin():
        # As a merge leaves it: succeeded, with a cache key (set here directly).
        parent = session.get(Evaluation, created["id"])
        assert parent is not None
        key = parent.cache_key
    jobs = [job for job in (_claim(engine, f"w{n}") for n in range(4)) if job is not None]
    _finish_all_but(engine, jobs, 1)
    with queue.guarded_write(engine, jobs[-1], 60) as session:
        parent_id = queue.succeed_shard(session, jobs[-1])
        assert parent_id == created["id"]
        succeed_sharded(session, parent_id, now=queue.db_now(session), results={}, cache_key=key)
    again = client.post("/evaluations", json={**_body(tiny_model_dir, 4), "cache": True})
    assert again.status_code == 200, again.text
    assert again.json()["cached_from"] == created["id"] and again.json()["shards"] is None


def test_shards_on_another_model_or_engine_are_not_merged() -> None:
    def shard(index: int, fingerprint: str, dtype: str, device: str) -> Evaluation:
        return Evaluation(
            id=f"ev_{index}",
            shard_index=index,
            model_fingerprint=fingerprint,
            prompt_format="plain",
            engine={"backend": "transformers", "dtype": dtype, "device": device, "version": "5"},
        )

    # Which GPU of a kind a shard ran on changes nothing; CPU or CUDA kernels do.
    same = [shard(0, "sha256:a", "float32", "cuda:0"), shard(1, "sha256:a", "float32", "cuda:1")]
    assert disagreement(same) is None
    devices = [shard(0, "sha256:a", "float32", "cpu"), shard(1, "sha256:a", "float32", "cuda:0")]
    found = disagreement(devices)
    assert found is not None and "device kind cuda" in found
    other_model = [shard(0, "sha256:a", "float32", "cpu"), shard(1, "sha256:b", "float32", "cpu")]
    found = disagreement(other_model)
    assert found is not None and "shard 1: fingerprint sha256:b" in found
    other_dtype = [shard(0, "sha256:a", "float32", "cpu"), shard(1, "sha256:a", "bfloat16", "cpu")]
    found = disagreement(other_dtype)
    assert found is not None and "dtype bfloat16" in found


def test_the_python_client_queues_a_sharded_evaluation(client: Any, tiny_model_dir: Path) -> None:
    from forgetguard import Client

    fg = Client("http://testserver", http=client)  # TestClient is an httpx.Client
    body = _body(tiny_model_dir, 2)
    queued = fg.evaluate(
        str(tiny_model_dir),
        suites=body["suites"],
        prompt_format="plain",
        max_new_tokens=4,
        cache=False,
        shards=2,
    )
    shown = client.get(f"/evaluations/{queued.id}").json()
    assert shown["shards"]["total"] == 2 and len(shown["shards"]["data"]) == 2


def test_a_cancel_racing_shards_that_fail_for_good_neither_deadlocks_nor_loses_a_write(
    client: Any, engine: Engine, tiny_model_dir: Path
) -> None:
    """The user cancels the evaluation while two of its shards fail for good: each side locks
    several shard rows. Every round ends with the evaluation and every shard finished, and
    neither side raised (on PostgreSQL a lock cycle would abort one of them)."""
    from app.core.errors import Problem
    from app.evaluations import service

    for _round in range(15):
        created = _sharded(client, tiny_model_dir)
        jobs = [job for job in (_claim(engine, f"w{n}") for n in range(4)) if job is not None]
        assert len(jobs) == 4
        start = threading.Barrier(3)
        errors: list[BaseException] = []

        def cancel(
            parent: str = created["id"],
            start: threading.Barrier = start,
            errors: list[BaseException] = errors,
        ) -> None:
            try:
                start.wait()
                with session_factory(engine)() as session:
                    service.cancel(session=session, evaluation_id=parent)
            except Problem as problem:  # a failure that came first: "already failed"
                if problem.status != 409:
                    errors.append(problem)
            except BaseException as exc:  # reported by the test, in its own thread
                errors.append(exc)

        def fail(
            job: queue.ClaimedJob,
            start: threading.Barrier = start,
            errors: list[BaseException] = errors,
        ) -> None:
            try:
                start.wait()
                queue.fail(engine, job, "CUDA out of memory", retryable=False)
            except BaseException as exc:
                errors.append(exc)

        threads = [
            threading.Thread(target=cancel),
            threading.Thread(target=fail, args=(jobs[3],)),
            threading.Thread(target=fail, args=(jobs[1],)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not errors, errors
        shown = client.get(f"/evaluations/{created['id']}").json()
        assert shown["status"] in ("cancelled", "failed")
        assert {s["status"] for s in shown["shards"]["data"]} <= {"cancelled", "failed"}
