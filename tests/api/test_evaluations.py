"""POST/GET /evaluations: validation, queueing, pagination, cancel."""

from __future__ import annotations

from pathlib import Path

from tests.samples import CAPITAL_QUESTION

QA_SUITE = {
    "name": "tiny-qa",
    "kind": "qa",
    "items": [
        CAPITAL_QUESTION,
        {
            "id": "q2",
            "question": "Who wrote Hamlet?",
            "answers": ["Shakespeare"],
            "category": "lit",
        },
    ],
}


def body(model: Path, **extra):  # type: ignore[no-untyped-def]
    return {"model": {"path": str(model)}, "suites": [QA_SUITE], **extra}


def test_post_evaluation_queues_and_points_to_it(client, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    response = client.post("/evaluations", json=body(tiny_model_dir, label="base"))
    assert response.status_code == 202
    data = response.json()
    assert response.headers["location"] == f"/evaluations/{data['id']}"
    assert data["status"] == "queued" and data["label"] == "base"
    assert data["progress"] == {
        "done": 0,
        "total": 2,
        "stage": "queued",
        "percent": None,  # a worker measures these
        "eta_seconds": None,
    }
    assert data["suites"][0]["name"] == "tiny-qa" and data["suites"][0]["content_hash"].startswith(
        "sha256:"
    )
    assert data["generation"] == {"max_new_tokens": 50, "stop": []}
    assert client.get(data["id"] and f"/evaluations/{data['id']}").json()["id"] == data["id"]


def test_builtin_suites_by_name_and_version(client, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    response = client.post(
        "/evaluations",
        json={
            "model": {"path": str(tiny_model_dir)},
            "suites": ["general-qa@1", "forgetting-checklist"],
        },
    )
    assert response.status_code == 202, response.text
    suites = response.json()["suites"]
    assert [s["name"] for s in suites] == ["general-qa", "forgetting-checklist"]
    assert suites[0]["item_count"] >= 200


def test_model_outside_roots_is_403_and_queues_nothing(client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    response = client.post("/evaluations", json=body(outside))
    assert response.status_code == 403
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "outside the allowed roots" in response.json()["detail"]
    assert client.get("/evaluations").json()["data"] == []


def test_missing_model_dir_is_422(client, settings) -> None:  # type: ignore[no-untyped-def]
    missing = settings.model_roots[0] / "no-such-model"
    response = client.post("/evaluations", json=body(missing))
    assert response.status_code == 422
    assert "not a directory" in response.json()["detail"]


def test_empty_suite_is_422_and_queues_nothing(client, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    response = client.post(
        "/evaluations",
        json={"model": {"path": str(tiny_model_dir)}, "suites": [{**QA_SUITE, "items": []}]},
    )
    assert response.status_code == 422
    problem = response.json()
    assert problem["status"] == 422 and problem["errors"][0]["loc"][-1] == "items"
    assert client.get("/evaluations").json()["data"] == []


def test_unknown_suite_name_is_422(client, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    response = client.post(
        "/evaluations", json={"model": {"path": str(tiny_model_dir)}, "suites": ["nope"]}
    )
    assert response.status_code == 422
    assert "'nope'" in response.json()["detail"]


def test_unknown_evaluation_is_404_problem(client) -> None:  # type: ignore[no-untyped-def]
    for path in ("/evaluations/ev_missing", "/evaluations/ev_missing/items"):
        response = client.get(path)
        assert response.status_code == 404
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["title"] == "Evaluation not found"


def test_list_is_newest_first_and_paginates(client, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    ids = [client.post("/evaluations", json=body(tiny_model_dir)).json()["id"] for _ in range(5)]
    first = client.get("/evaluations?limit=2").json()
    assert [e["id"] for e in first["data"]] == ids[::-1][:2] and first["has_more"]
    second = client.get(f"/evaluations?limit=2&cursor={first['next_cursor']}").json()
    third = client.get(f"/evaluations?limit=2&cursor={second['next_cursor']}").json()
    seen = [e["id"] for page in (first, second, third) for e in page["data"]]
    assert seen == ids[::-1] and not third["has_more"] and third["next_cursor"] is None
    assert client.get("/evaluations?status=succeeded").json()["data"] == []


def test_cancel_queued_then_cancel_again_is_ok_but_finished_is_409(client, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    ev = client.post("/evaluations", json=body(tiny_model_dir)).json()
    cancelled = client.post(f"/evaluations/{ev['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert client.get(f"/evaluations/{ev['id']}").json()["finished_at"] is not None


def test_compare_requires_finished_runs(client, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    ev = client.post("/evaluations", json=body(tiny_model_dir)).json()
    response = client.get(f"/compare?before={ev['id']}&after={ev['id']}")
    assert response.status_code == 409 and "queued" in response.json()["detail"]
    assert client.get("/compare?before=ev_x&after=ev_y").status_code == 404


def test_wrong_method_and_unknown_route_are_problems(client) -> None:  # type: ignore[no-untyped-def]
    assert client.delete("/evaluations").status_code == 405
    response = client.get("/no/such/route")
    assert response.status_code == 404 and response.json()["status"] == 404


def test_healthz(client) -> None:  # type: ignore[no-untyped-def]
    assert client.get("/healthz").json() == {"status": "ok", "database": "ok"}
