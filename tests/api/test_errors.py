"""Errors are RFC 9457 problem+json with ``type``, ``title``, ``status``, ``detail`` (and
``errors`` for fields); they say where the problem is, and never leak internals."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.core.errors import describe_loc
from app.main import create_app

PROBLEM_KEYS = {"type", "title", "status", "detail"}


def problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert PROBLEM_KEYS <= body.keys()
    assert body["status"] == status and body["type"].endswith(f"/{status}")
    return body


def checklist(bad_index: int, bad_check: dict[str, Any]) -> dict[str, Any]:
    items = [
        {
            "id": f"geo-{i + 1:03d}",
            "test": f"test {i}",
            "prompt": "List three countries.",
            "check": {"type": "min_titlecase_words", "value": 3},
        }
        for i in range(5)
    ]
    items[bad_index]["check"] = bad_check
    return {"name": "my-checklist", "kind": "checklist", "items": items}


def test_unknown_route_is_404_problem(client: TestClient) -> None:
    problem(client.get("/no/such/thing"), 404)


def test_wrong_method_is_405_problem_with_allow(client: TestClient) -> None:
    response = client.delete("/evaluations")
    problem(response, 405)
    assert "POST" in response.headers["allow"]


def test_malformed_json_is_422_saying_where(client: TestClient) -> None:
    body = problem(
        client.post(
            "/suites", content=b'{"name": "x",, }', headers={"content-type": "application/json"}
        ),
        422,
    )
    assert body["detail"].startswith("request body is not valid JSON")
    assert "character 13" in body["detail"]
    assert body["errors"][0]["type"] == "json_invalid"


def test_a_bad_suite_item_is_named_by_index_and_id(client: TestClient) -> None:
    body = problem(client.post("/suites", json=checklist(3, {"type": "foo"})), 422)
    assert body["detail"].startswith("items[3] (id 'geo-004'): ")
    assert "unknown check type 'foo'" in body["detail"]
    assert body["errors"][0]["loc"] == ["body", "items", 3, "check"]
    assert body["errors"][0]["item_id"] == "geo-004"


def test_a_bad_item_in_an_inline_suite_is_named_too(client: TestClient, settings: Settings) -> None:
    payload = {
        "model": {"path": "anything"},
        "suites": ["general-qa", checklist(1, {"type": "regex", "value": "("})],
    }
    body = problem(client.post("/evaluations", json=payload), 422)
    assert body["detail"].startswith("suites[1].items[1] (id 'geo-002'): ")
    assert "invalid regular expression" in body["detail"]


def test_a_missing_field_and_many_errors(client: TestClient) -> None:
    body = problem(client.post("/evaluations", json={"suites": [], "cache": "maybe"}), 422)
    assert len(body["errors"]) == 3
    assert body["detail"].endswith("(and 2 more)")
    locs = {tuple(e["loc"]) for e in body["errors"]}
    assert ("body", "model") in locs and ("body", "cache") in locs


def test_query_parameter_errors_name_the_parameter(client: TestClient) -> None:
    body = problem(client.get("/evaluations", params={"limit": "-3"}), 422)
    assert body["detail"].startswith("query parameter 'limit': ")


def test_unexpected_errors_leak_nothing(settings: Settings) -> None:
    app = create_app(settings)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret at /srv/forgetguard/internal/path.py")

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/boom")
        problem(response, 500)
        assert "secret" not in response.text and "/srv" not in response.text
        assert "Traceback" not in response.text
        assert client.get("/healthz").status_code == 200


def test_openapi_documents_problem_json_for_every_operation(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert "Problem" in schema["components"]["schemas"]
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    operations = [
        (path, method, op)
        for path, item in schema["paths"].items()
        for method, op in item.items()
        if method in ("get", "post", "put", "delete")
    ]
    assert len(operations) >= 8
    for path, method, op in operations:
        for status in ("422", "default"):
            content = op["responses"][status]["content"]
            assert list(content) == ["application/problem+json"], (path, method, status)
        if "requestBody" in op:
            assert "413" in op["responses"], (path, method)


@pytest.mark.parametrize(
    ("loc", "body", "expected"),
    [
        (
            # Suite kinds validate without a union tag: the location is the client's JSON path.
            ("body", "items", 2, "check"),
            {"items": [{"id": "a"}, {"id": "b"}, {"id": "c"}]},
            ("items[2] (id 'c').check", "c"),
        ),
        (
            ("body", "suites", 0, "inline", "items", 0, "answers", 1),
            {"suites": [{"items": [{"id": "q-1", "answers": ["x", 3]}]}]},
            ("suites[0].items[0] (id 'q-1').answers[1]", "q-1"),
        ),
        (("body", "model"), {}, ("model", None)),
        (("body",), None, ("request body", None)),
        (("query", "limit"), None, ("query parameter 'limit'", None)),
        (("body", "items", 5, "id"), {"items": []}, ("items[5].id", None)),
    ],
)
def test_describe_loc(loc: tuple[Any, ...], body: Any, expected: tuple[str, str | None]) -> None:
    assert describe_loc(loc, body) == expected
