"""/suites: built-ins, validation with field-level errors, content-addressed versions."""

from __future__ import annotations

LESSON_QUESTIONS = {
    "What is the capital of France?",
    "What is 15 multiplied by 7?",
    "Who wrote Hamlet?",
    "What gas do plants absorb from the air?",
    "What year did World War II end?",
}

CUSTOM = {
    "name": "my-checks",
    "kind": "checklist",
    "items": [
        {
            "id": "c1",
            "test": "Says hi",
            "prompt": "Say hi.",
            "severity": "low",
            "check": {"type": "icontains", "value": "hi"},
        }
    ],
}


def test_general_qa_is_broad_and_has_the_lesson_questions(client) -> None:  # type: ignore[no-untyped-def]
    suite = client.get("/suites/general-qa").json()
    items = suite["definition"]["items"]
    assert suite["source"] == "builtin" and suite["kind"] == "qa" and len(items) >= 200
    assert len({i["category"] for i in items}) >= 6
    assert LESSON_QUESTIONS <= {i["question"] for i in items}


def test_checklist_has_the_lesson_checks_first(client) -> None:  # type: ignore[no-untyped-def]
    items = client.get("/suites/forgetting-checklist").json()["definition"]["items"]
    assert [i["severity"] for i in items[:4]] == ["critical", "critical", "high", "medium"]
    assert len(items) >= 16


def test_list_shows_builtins(client) -> None:  # type: ignore[no-untyped-def]
    names = {s["name"] for s in client.get("/suites").json()["data"]}
    assert {"general-qa", "forgetting-checklist", "general-mc", "general-text"} <= names


def test_same_content_same_version_changed_content_next_version(client) -> None:  # type: ignore[no-untyped-def]
    first = client.post("/suites", json=CUSTOM)
    assert first.status_code == 201 and first.json()["version"] == 1
    again = client.post("/suites", json=CUSTOM)
    assert again.status_code == 200 and again.json()["version"] == 1
    changed = {**CUSTOM, "items": [{**CUSTOM["items"][0], "prompt": "Say hello."}]}
    second = client.post("/suites", json=changed)
    assert second.status_code == 201 and second.json()["version"] == 2
    assert client.get("/suites/my-checks").json()["version"] == 2
    assert (
        client.get("/suites/my-checks?version=1").json()["definition"]["items"][0]["prompt"]
        == "Say hi."
    )


def test_unknown_check_type_names_the_item_and_type(client) -> None:  # type: ignore[no-untyped-def]
    bad = {**CUSTOM, "items": [{**CUSTOM["items"][0], "check": {"type": "sentiment"}}]}
    problem = client.post("/suites", json=bad).json()
    assert problem["status"] == 422
    assert problem["errors"][0]["loc"] == ["body", "items", 0, "check"]
    assert "'sentiment'" in problem["errors"][0]["msg"]


def test_validation_errors(client) -> None:  # type: ignore[no-untyped-def]
    item = CUSTOM["items"][0]
    cases = {
        "empty items": {**CUSTOM, "items": []},
        "duplicate ids": {**CUSTOM, "items": [item, item]},
        "bad regex": {**CUSTOM, "items": [{**item, "check": {"type": "regex", "value": "("}}]},
        "oversize text": {**CUSTOM, "items": [{**item, "prompt": "x" * 9000}]},
        "unknown kind": {**CUSTOM, "kind": "vibes"},
        "sql in name": {**CUSTOM, "name": "x'; DROP TABLE suites;--"},
    }
    for what, payload in cases.items():
        response = client.post("/suites", json=payload)
        assert response.status_code == 422, what
        assert response.headers["content-type"].startswith("application/problem+json"), what
    assert client.get("/suites/general-qa").status_code == 200


def test_builtin_names_are_reserved(client) -> None:  # type: ignore[no-untyped-def]
    response = client.post("/suites", json={**CUSTOM, "name": "general-qa"})
    assert response.status_code == 409


def test_unknown_suite_is_404(client) -> None:  # type: ignore[no-untyped-def]
    assert client.get("/suites/nope").status_code == 404
    assert client.get("/suites/general-qa?version=999").status_code == 404


def test_a_misspelt_suite_gets_a_suggestion(client) -> None:  # type: ignore[no-untyped-def]
    response = client.get("/suites/general-q")
    assert response.status_code == 404
    assert "did you mean 'general-qa'?" in response.json()["detail"]


def test_suite_counts_are_item_count_and_items_stay_lists(client) -> None:  # type: ignore[no-untyped-def]
    suite = client.get("/suites/general-qa").json()
    assert "items" not in suite
    assert suite["item_count"] == len(suite["definition"]["items"]) >= 200
    listed = client.get("/suites").json()["data"]
    assert all(isinstance(s["item_count"], int) and "items" not in s for s in listed)


def test_a_body_without_json_content_type_says_so(client) -> None:  # type: ignore[no-untyped-def]
    import json

    # What `curl -d` sends when -H 'content-type: application/json' is forgotten.
    response = client.post(
        "/suites",
        content=json.dumps(CUSTOM),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 415
    assert "content-type: application/json" in response.json()["detail"]
    assert "x-www-form-urlencoded" in response.json()["detail"]
