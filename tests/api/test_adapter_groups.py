"""POST /evaluations with ``model.adapters``: one evaluation per adapter of one base, queued as a
group; each checked like ``adapter_path``, cached and listed on its own; the 422s (and the 403)
for requests that cannot be run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from app.core.schemas import MAX_ADAPTERS
from tests.stored import qa_row, store_finished
from tests.tiny_model import build_lora_adapter

SUITE = {
    "name": "group-qa",
    "kind": "qa",
    "items": [{"id": "q1", "question": "What is the capital of France?", "answers": ["Paris"]}],
}
RESULTS = {
    "group-qa": {
        "kind": "qa",
        "overall_accuracy": 1.0,
        "correct": 1,
        "total": 1,
        "by_category": {"general": {"correct": 1, "total": 1, "accuracy": 1.0}},
    }
}


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path) -> list[str]:
    """Three LoRA adapters of the tiny model, under its (allowed) models root."""
    root = tiny_model_dir.parent / "group-adapters"
    return [
        str(
            path
            if (path := root / f"lora-{n}").is_dir()
            else build_lora_adapter(tiny_model_dir, path, seed=n)
        )
        for n in (1, 2, 3)
    ]


def _post(client: Any, model: dict[str, Any], **headers: str) -> Any:
    return client.post("/evaluations", json={"model": model, "suites": [SUITE]}, headers=headers)


def _finish(client: Any, evaluation_id: str) -> None:
    row = qa_row(
        evaluation_id, "group-qa", 0, SUITE["items"][0], response="Paris", passed=True, category="g"
    )
    store_finished(
        client,
        evaluation_id,
        [row],
        status="succeeded",
        results=RESULTS,
        progress={"done": 1, "total": 1, "stage": "done"},
    )


def test_adapters_queue_one_evaluation_each_as_a_group(
    client: Any, tiny_model_dir: Path, adapters: list[str]
) -> None:
    response = _post(client, {"path": str(tiny_model_dir), "adapters": adapters})
    assert response.status_code == 202, response.text
    group = response.json()
    assert group["group"].startswith("eg_")
    assert response.headers["location"] == f"/evaluations?group={group['group']}"
    evaluations = group["data"]
    assert [e["model"]["adapter_path"] for e in evaluations] == adapters  # as listed
    assert {e["status"] for e in evaluations} == {"queued"}
    assert {e["group"] for e in evaluations} == {group["group"]}
    assert {e["model"]["path"] for e in evaluations} == {str(tiny_model_dir)}
    # Each fingerprint covers its adapter: three keys for the cache, none the base's.
    base = _post(client, {"path": str(tiny_model_dir)}).json()
    fingerprints = {e["model"]["fingerprint"] for e in evaluations}
    assert len(fingerprints) == 3 and base["model"]["fingerprint"] not in fingerprints
    assert base["group"] is None

    listed = client.get("/evaluations", params={"group": group["group"]}).json()["data"]
    assert sorted(e["id"] for e in listed) == sorted(e["id"] for e in evaluations)
    one = client.get(f"/evaluations/{evaluations[1]['id']}").json()
    assert one["group"] == group["group"] and one["model"]["adapter_path"] == adapters[1]
    assert client.get("/evaluations", params={"group": "eg_none"}).json()["data"] == []


def test_each_adapter_is_cached_on_its_own(
    client: Any, tiny_model_dir: Path, adapters: list[str]
) -> None:
    first = _post(client, {"path": str(tiny_model_dir), "adapters": adapters}).json()["data"]
    _finish(client, first[1]["id"])
    # The same adapter alone is the same evaluation: answered from the group's run.
    alone = _post(client, {"path": str(tiny_model_dir), "adapter_path": adapters[1]})
    assert alone.status_code == 200 and alone.json()["cached_from"] == first[1]["id"]
    again = _post(client, {"path": str(tiny_model_dir), "adapters": adapters})
    assert again.status_code == 202  # two of three still have to run
    cached = [e["cached_from"] for e in again.json()["data"]]
    assert cached == [None, first[1]["id"], None]
    for evaluation in first:
        if evaluation["id"] != first[1]["id"]:
            _finish(client, evaluation["id"])
    answered = _post(client, {"path": str(tiny_model_dir), "adapters": adapters})
    assert answered.status_code == 200  # every adapter answered from the cache: nothing queued
    assert [e["cached_from"] for e in answered.json()["data"]] == [e["id"] for e in first]


def test_a_repeated_idempotency_key_answers_the_same_group(
    client: Any, tiny_model_dir: Path, adapters: list[str]
) -> None:
    model = {"path": str(tiny_model_dir), "adapters": adapters}
    created = _post(client, model, **{"Idempotency-Key": "sweep-1"})
    replayed = _post(client, model, **{"Idempotency-Key": "sweep-1"})
    assert created.status_code == 202 and replayed.status_code == 200
    assert replayed.headers["idempotent-replayed"] == "true"
    assert replayed.json() == created.json()
    assert len(client.get("/evaluations").json()["data"]) == 3


def test_vllm_takes_adapters_as_lora_requests(
    client: Any, tiny_model_dir: Path, adapters: list[str]
) -> None:
    model = {"path": str(tiny_model_dir), "adapters": adapters[:2], "backend": "vllm"}
    response = _post(client, model)
    assert response.status_code == 202, response.text
    assert [e["model"]["backend"] for e in response.json()["data"]] == ["vllm", "vllm"]


def _refusals(tiny: Path, adapters: list[str]) -> dict[str, tuple[dict[str, Any], int, str]]:
    """name: (model, status, words of the detail or of the validation message)."""
    base = {"path": str(tiny)}
    return {
        "with-adapter-path": (
            {**base, "adapters": adapters, "adapter_path": adapters[0]},
            422,
            'give "adapter_path" (one adapter) or "adapters"',
        ),
        "duplicate": (
            {**base, "adapters": [adapters[0], adapters[1], adapters[0]]},
            422,
            "more than once",
        ),
        "too-many": (
            {**base, "adapters": [f"{adapters[0]}/../lora-{n}" for n in range(MAX_ADAPTERS + 1)]},
            422,
            f"at most {MAX_ADAPTERS} items",
        ),
        "empty": ({**base, "adapters": []}, 422, "at least 1 item"),
        "served-model": (
            {
                "backend": "openai",
                "endpoint": "http://127.0.0.1:9/v1",
                "model": "m",
                "adapters": adapters,
            },
            422,
            '"adapters" do not apply',
        ),
        "not-an-adapter": (
            {**base, "adapters": [adapters[0], str(tiny)]},
            422,
            "is not a peft adapter directory (no adapter_config.json)",
        ),
        "outside-the-roots": (
            {**base, "adapters": [adapters[0], adapters[1], "/etc"]},
            403,
            "outside the allowed roots",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "with-adapter-path",
        "duplicate",
        "too-many",
        "empty",
        "served-model",
        "not-an-adapter",
        "outside-the-roots",
    ],
)
def test_requests_that_cannot_run_are_refused_and_queue_nothing(
    client: Any, tiny_model_dir: Path, adapters: list[str], case: str
) -> None:
    model, status, words = _refusals(tiny_model_dir, adapters)[case]
    response = _post(client, model)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    said = problem["detail"] + " ".join(str(e.get("msg")) for e in problem.get("errors") or [])
    assert words in said, problem
    if case == "not-an-adapter":  # which adapter of the list: its JSON path
        assert problem["errors"][0]["loc"] == ["body", "model", "adapters", 1]
    if case == "outside-the-roots":
        assert problem["errors"][0]["loc"] == ["body", "model", "adapters", 2]
    assert client.get("/evaluations").json()["data"] == []


def test_the_openapi_schema_says_what_is_accepted_and_answered(client: Any) -> None:
    schema = client.get("/openapi.json").json()
    model_ref = schema["components"]["schemas"]["ModelRef"]["properties"]["adapters"]
    listed = next(s for s in model_ref["anyOf"] if s.get("type") == "array")
    assert listed["maxItems"] == MAX_ADAPTERS and listed["minItems"] == 1
    accepted = schema["paths"]["/evaluations"]["post"]["responses"]["202"]
    refs = {s["$ref"] for s in accepted["content"]["application/json"]["schema"]["anyOf"]}
    assert refs == {
        "#/components/schemas/EvaluationPublic",
        "#/components/schemas/EvaluationGroupPublic",
    }


def test_the_python_client_queues_and_reads_a_group(
    client: Any, tiny_model_dir: Path, adapters: list[str]
) -> None:
    from forgetguard import Client, EvaluationGroup

    fg = Client("http://testserver", http=client)  # TestClient is an httpx.Client
    group = fg.evaluate_adapters(str(tiny_model_dir), adapters, suites=[SUITE], label="sweep")
    assert isinstance(group, EvaluationGroup) and group.group.startswith("eg_")
    assert [e.model["adapter_path"] for e in group.data] == adapters
    assert {e.label for e in group.data} == {"sweep"}
    again = fg.evaluation_group(group.group)
    assert sorted(again.ids) == sorted(group.ids)
    assert {e.model["adapter_path"] for e in again.data} == set(adapters)
    assert fg.evaluation_group("eg_none").data == []
