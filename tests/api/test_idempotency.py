"""Idempotency-Key on POST: same key and body → the original resource (200), same key
and another body → 422, and concurrent retries still create exactly one job."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from app.core.tables import Evaluation, IdempotencyKey
from app.web.idempotency import body_hash

SUITE = {
    "name": "idem-qa",
    "kind": "qa",
    "items": [{"id": "q1", "question": "What is the capital of France?", "answers": ["Paris"]}],
}


def body(model: Path, **extra: Any) -> dict[str, Any]:
    return {"model": {"path": str(model)}, "suites": [SUITE], "label": "retry me", **extra}


def count(client: Any, model: type = Evaluation) -> int:
    with client.app.state.sessionmaker() as session:
        return int(session.execute(select(func.count()).select_from(model)).scalar_one())


def test_same_post_twice_with_one_key_queues_one_job(client: Any, tiny_model_dir: Path) -> None:
    headers = {"Idempotency-Key": "ci-run-42-base"}
    first = client.post("/evaluations", json=body(tiny_model_dir), headers=headers)
    again = client.post("/evaluations", json=body(tiny_model_dir), headers=headers)
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["location"] == f"/evaluations/{first.json()['id']}"
    assert count(client) == 1


def test_same_key_with_another_body_is_422_and_queues_nothing(
    client: Any, tiny_model_dir: Path
) -> None:
    headers = {"Idempotency-Key": "k-1"}
    first = client.post("/evaluations", json=body(tiny_model_dir), headers=headers)
    other = client.post("/evaluations", json=body(tiny_model_dir, label="else"), headers=headers)
    assert other.status_code == 422
    assert other.headers["content-type"].startswith("application/problem+json")
    assert "different body" in other.json()["detail"]
    assert other.json()["resource_id"] == first.json()["id"]
    assert count(client) == 1


def test_key_order_and_whitespace_do_not_make_another_body(
    client: Any, tiny_model_dir: Path
) -> None:
    headers = {"Idempotency-Key": "k-2", "Content-Type": "application/json"}
    payload = body(tiny_model_dir)
    compact = json.dumps(payload, separators=(",", ":"))
    spaced = json.dumps(dict(reversed(list(payload.items()))), indent=2)
    first = client.post("/evaluations", content=compact, headers=headers)
    again = client.post("/evaluations", content=spaced, headers=headers)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]


def test_without_a_key_or_with_another_key_each_post_queues(
    client: Any, tiny_model_dir: Path
) -> None:
    client.post("/evaluations", json=body(tiny_model_dir))
    client.post("/evaluations", json=body(tiny_model_dir))
    client.post("/evaluations", json=body(tiny_model_dir), headers={"Idempotency-Key": "a"})
    client.post("/evaluations", json=body(tiny_model_dir), headers={"Idempotency-Key": "b"})
    assert count(client) == 4
    assert count(client, IdempotencyKey) == 2


def test_a_failed_request_stores_no_key(client: Any, settings: Any) -> None:
    headers = {"Idempotency-Key": "k-3"}
    missing = body(settings.model_roots[0] / "no-such-model")
    assert client.post("/evaluations", json=missing, headers=headers).status_code == 422
    assert count(client, IdempotencyKey) == 0


def test_keys_are_scoped_by_path(client: Any, tiny_model_dir: Path) -> None:
    headers = {"Idempotency-Key": "shared"}
    suite = client.post("/suites", json=SUITE, headers=headers)
    evaluation = client.post("/evaluations", json=body(tiny_model_dir), headers=headers)
    assert suite.status_code == 201 and evaluation.status_code == 202


def test_suite_upload_replays_with_200(client: Any) -> None:
    headers = {"Idempotency-Key": "upload-1"}
    first = client.post("/suites", json=SUITE, headers=headers)
    again = client.post("/suites", json=SUITE, headers=headers)
    assert first.status_code == 201 and again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["version"] == first.json()["version"] == 1
    changed = {**SUITE, "description": "another body"}
    assert client.post("/suites", json=changed, headers=headers).status_code == 422


def test_an_empty_or_oversized_key_is_422(client: Any, tiny_model_dir: Path) -> None:
    for key in (" ", "k" * 256):
        response = client.post(
            "/evaluations", json=body(tiny_model_dir), headers={"Idempotency-Key": key}
        )
        assert response.status_code == 422 and "Idempotency-Key" in response.json()["detail"]
    assert count(client) == 0


def test_concurrent_retries_with_one_key_create_one_job(client: Any, tiny_model_dir: Path) -> None:
    headers = {"Idempotency-Key": "stampede"}
    with ThreadPoolExecutor(max_workers=6) as pool:
        responses = list(
            pool.map(
                lambda _: client.post("/evaluations", json=body(tiny_model_dir), headers=headers),
                range(6),
            )
        )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 5 + [202], [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert count(client) == 1


def test_body_hash_is_canonical_json() -> None:
    assert body_hash(b'{"a": 1, "b": [1, 2]}') == body_hash('{"b":[1,2],"a":1}')
    assert body_hash({"a": 1}) == body_hash(b'{"a":1}')
    assert body_hash(b'{"a": 1}') != body_hash(b'{"a": 2}')
    assert body_hash(b"not json").startswith("sha256:")
