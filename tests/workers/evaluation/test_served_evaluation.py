"""A served model's lies through the real worker loop (issue 29, parts 3 and 4): each fails
the evaluation once, quickly, with the field named and nothing stored; long answers are stored
cut and marked; a cancelled evaluation frees its worker within seconds, even mid-request; and
``/compare`` answers a problem, never a 500, for rows stored before these checks existed."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, insert, select, update

from app.core.config import Settings
from app.core.tables import Evaluation, EvaluationItem, utcnow
from app.main import create_app
from tests.conftest import start_worker, wait_for
from tests.fake_openai import MODEL, fake_openai
from workers.main import Worker

TEXTS = {
    "name": "served-text",
    "kind": "perplexity",
    "items": [
        {"id": f"t{i}", "text": f"The quick brown fox number {i} jumps over the dog."}
        for i in range(4)
    ],
}
QA = {
    "name": "served-qa",
    "kind": "qa",
    "items": [
        {"id": f"q{i}", "question": f"What is the capital of France ({i})?", "answers": ["Paris"]}
        for i in range(3)
    ],
}


def _served(settings: Settings, url: str, **changes: Any) -> Settings:
    return settings.model_copy(update={"endpoints": [url], **changes})


def _evaluate(settings: Settings, url: str, suite: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Submit, run one worker pass in-process; the evaluation and its stored item count."""
    with TestClient(create_app(settings)) as client:
        response = client.post(
            "/evaluations",
            json={
                "model": {"backend": "openai", "endpoint": url, "model": MODEL},
                "suites": [suite],
                "prompt_format": "plain",
            },
        )
        assert response.status_code == 202, response.text
        evaluation_id = response.json()["id"]
        Worker(settings, device="cpu", kinds=("evaluation",), once=True).run()
        body = client.get(f"/evaluations/{evaluation_id}").json()
        with client.app.state.sessionmaker() as session:
            items = session.execute(
                select(func.count())
                .select_from(EvaluationItem)
                .where(EvaluationItem.evaluation_id == evaluation_id)
            ).scalar_one()
    return body, int(items)


@pytest.mark.parametrize(
    ("mode", "suite", "field"),
    [
        ("nan", TEXTS, "token_logprobs[1] is NaN"),
        ("minus-infinity", TEXTS, "token_logprobs[1] is -Infinity"),
        ("huge-logprob", TEXTS, "token_logprobs[1] is the number -1e+300"),
        ("positive-logprob", TEXTS, "token_logprobs[1] is the number 3.5"),
        ("short-offsets", TEXTS, "text_offset has"),
        ("string-logprobs", TEXTS, "is the string '-0.5'"),
        ("list-body", QA, "the body is a list of 1"),
        ("choices-object", QA, "choices is an object"),
        ("text-number", QA, "choices[0].text is the number 42"),
    ],
)
def test_a_lie_fails_the_evaluation_once_naming_the_field_and_stores_nothing(
    settings: Settings, mode: str, suite: dict[str, Any], field: str
) -> None:
    with fake_openai(mode) as server:
        started = time.monotonic()
        body, items = _evaluate(_served(settings, server.url), server.url, suite)
        took = time.monotonic() - started
    assert body["status"] == "failed", body
    assert body["attempts"] == 1  # permanent: not retried through every attempt
    assert field in body["error"], body["error"]
    assert items == 0
    assert took < 30, took


def test_a_trickling_server_fails_once_at_the_deadline(settings: Settings) -> None:
    with fake_openai("trickle") as server:
        started = time.monotonic()
        body, _ = _evaluate(
            _served(settings, server.url, endpoint_timeout_seconds=2.0), server.url, QA
        )
        took = time.monotonic() - started
    assert body["status"] == "failed" and body["attempts"] == 1, body
    assert "FORGETGUARD_ENDPOINT_TIMEOUT_SECONDS" in body["error"]
    assert took < 30, took


def test_a_huge_answer_fails_once_naming_the_cap(settings: Settings) -> None:
    with fake_openai("huge-body") as server:
        body, _ = _evaluate(
            _served(settings, server.url, endpoint_max_response_bytes=1 << 20), server.url, QA
        )
    assert body["status"] == "failed" and body["attempts"] == 1, body
    assert "FORGETGUARD_ENDPOINT_MAX_RESPONSE_BYTES" in body["error"]


def test_a_long_answer_is_stored_cut_and_marked_truncated(settings: Settings) -> None:
    long = " Paris " + "blah " * 200_000  # 1 MB: scored whole, stored cut
    with fake_openai(completion=long) as server:
        served = _served(settings, server.url, max_stored_response_chars=1000)
        with TestClient(create_app(served)) as client:
            response = client.post(
                "/evaluations",
                json={
                    "model": {"backend": "openai", "endpoint": server.url, "model": MODEL},
                    "suites": [QA],
                    "prompt_format": "plain",
                },
            )
            evaluation_id = response.json()["id"]
            Worker(served, device="cpu", kinds=("evaluation",), once=True).run()
            body = client.get(f"/evaluations/{evaluation_id}").json()
            assert body["status"] == "succeeded", body["error"]
            assert body["results"]["served-qa"]["correct"] == 3  # scored on the whole answer
            page = client.get(f"/evaluations/{evaluation_id}/items")
    items = page.json()["data"]
    assert [item["truncated"] for item in items] == [True] * 3
    assert all(len(item["response"]) == 1000 for item in items)
    assert len(page.content) < 20_000


def test_a_cancelled_evaluation_frees_its_worker_within_seconds_mid_request(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with fake_openai("trickle") as server:
        monkeypatch.setenv("FORGETGUARD_ENDPOINTS", server.url)  # the worker's allow-list
        served = _served(settings, server.url)
        worker = start_worker(served, "--kinds", "evaluation", log=tmp_path / "worker.log")
        try:
            with TestClient(create_app(served)) as client:
                evaluation_id = client.post(
                    "/evaluations",
                    json={
                        "model": {"backend": "openai", "endpoint": server.url, "model": MODEL},
                        "suites": [QA],
                        "prompt_format": "plain",
                    },
                ).json()["id"]

                def busy() -> bool:
                    workers = client.get("/workers").json()["data"]
                    return any((w["current_job"] or {}).get("id") == evaluation_id for w in workers)

                wait_for(busy, 120, what="the worker to take the evaluation")
                wait_for(lambda: len(server.requests) > 0, 60, what="a request in flight")
                time.sleep(1.0)  # mid-request: the server is trickling its answer
                assert client.post(f"/evaluations/{evaluation_id}/cancel").status_code == 200
                cancelled = time.monotonic()

                def idle() -> bool:
                    workers = client.get("/workers").json()["data"]
                    return bool(workers) and all(w["current_job"] is None for w in workers)

                wait_for(idle, 30, interval=0.1, what="the worker to be free again")
                took = time.monotonic() - cancelled
                status = client.get(f"/evaluations/{evaluation_id}").json()["status"]
        finally:
            worker.terminate()
            worker.wait(timeout=60)
    assert status == "cancelled"
    assert took < 5, took


def _store_perplexity(client: Any, evaluation_id: str, nll_sum: float, score: float = 2.0) -> None:
    rows = [
        {
            "evaluation_id": evaluation_id,
            "suite": "served-text",
            "item_id": item["id"],
            "position": n,
            "prompt": item["text"],
            "response": None,
            "passed": None,
            "score": score if n == 0 else 2.0,
            "category": "general",
            "severity": None,
            "details": {"nll_sum": nll_sum if n == 0 else 20.0, "tokens": 10},
        }
        for n, item in enumerate(TEXTS["items"])
    ]
    with client.app.state.sessionmaker() as session, session.begin():
        session.execute(insert(EvaluationItem), rows)
        session.execute(
            update(Evaluation)
            .where(Evaluation.id == evaluation_id)
            .values(status="succeeded", finished_at=utcnow(), results={})
        )


def test_old_rows_with_non_finite_numbers_are_a_409_on_compare_never_a_500(
    settings: Settings, tiny_model_dir: Path
) -> None:
    """What a worker wrote before these checks: SQLite kept NaN in item details (and turned a
    NaN score into NULL); PostgreSQL refused NaN in JSON but kept it in a float column."""
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        ids = [
            client.post(
                "/evaluations",
                json={"model": {"path": str(tiny_model_dir)}, "suites": [TEXTS], "cache": False},
            ).json()["id"]
            for _ in range(2)
        ]
        _store_perplexity(client, ids[0], 20.0)
        if settings.is_sqlite:
            _store_perplexity(client, ids[1], float("nan"))
        else:
            _store_perplexity(client, ids[1], 20.0, score=float("nan"))
        for route in ("/compare", "/ui/compare"):
            response = client.get(route, params={"before": ids[0], "after": ids[1]})
            assert response.status_code == 409, (route, response.text[:300])
            assert "non-finite" in response.text
        items = client.get(f"/evaluations/{ids[1]}/items")
        assert items.status_code == 200


def test_the_storage_path_refuses_non_finite_numbers_from_any_backend() -> None:
    from workers.engine.base import BadAnswer
    from workers.evaluation.run import storable_rows

    good = {"item_id": "a", "response": "x" * 50, "score": 1.0, "details": {"n": [1.0, 2]}}
    (kept,) = storable_rows([good], "s", max_response_chars=10)
    assert kept["response"] == "x" * 10 and kept["truncated"] is True
    for bad, where in (
        ({**good, "score": float("nan")}, "item 'a'.score"),
        ({**good, "details": {"n": [1.0, float("-inf")]}}, "item 'a'.details.n[1]"),
        ({**good, "response": "a\x00b"}, "item 'a'.response"),
    ):
        with pytest.raises(BadAnswer) as caught:
            storable_rows([good, bad], "s", max_response_chars=100)
        assert where in str(caught.value), str(caught.value)
