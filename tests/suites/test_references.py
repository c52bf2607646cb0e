"""Suite references: options, seeded stratified samples, groups, pulled benchmarks (API)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from app.core.config import Settings
from app.core.errors import Problem
from app.suites.references import parse, stratified_sample
from forgetguard.suites import Reference, expand, split_list, suite_names


def test_parse_reads_a_version_and_options() -> None:
    assert parse("mmlu") == Reference("mmlu")
    assert parse("mmlu@3") == Reference("mmlu", version=3)
    assert parse("mmlu@3,sample=2000,seed=1,shots=5,convention=lm-eval") == Reference(
        "mmlu", version=3, sample=2000, seed=1, shots=5, convention="lm-eval"
    )
    assert parse("mmlu@sample=20").derived and not parse("mmlu@2").derived


@pytest.mark.parametrize(
    "ref, words",
    [
        ("mmlu@sample=0", "sample in 'mmlu@sample=0' must be an integer from 1"),
        ("mmlu@shots=65", "shots in 'mmlu@shots=65' must be an integer from 0 to 64"),
        ("mmlu@sample=x", "got 'x'"),
        ("mmlu@color=red", "unknown option 'color'"),
        ("mmlu@0", "the version in 'mmlu@0' must be an integer from 1"),
    ],
)
def test_a_bad_reference_is_a_422_that_says_what_is_wrong(ref: str, words: str) -> None:
    with pytest.raises(Problem) as caught:
        parse(ref)
    assert caught.value.status == 422 and words in caught.value.detail


def test_the_gate_knows_the_names_a_run_will_hold_and_splits_lists_as_the_server_reads_them() -> (
    None
):
    assert suite_names("forgetting-standard@sample=50,seed=2") == [
        "hellaswag.sample-50.seed-2",
        "arc-challenge.sample-50.seed-2",
        "winogrande.sample-50.seed-2",
    ]
    assert suite_names("mmlu@2,convention=lm-eval,shots=5") == ["mmlu.lm-eval.5shot"]
    assert split_list("mmlu@sample=20,seed=1, general-qa,hellaswag@2") == [
        "mmlu@sample=20,seed=1",
        "general-qa",
        "hellaswag@2",
    ]


def test_a_group_expands_to_its_members_with_its_options() -> None:
    assert expand("forgetting-standard@sample=50") == [
        "hellaswag@sample=50",
        "arc-challenge@sample=50",
        "winogrande@sample=50",
    ]
    assert expand("general-qa@2") == ["general-qa@2"]


def test_a_sample_keeps_each_category_s_share_the_order_and_its_seed() -> None:
    items = [{"id": f"a{i}", "category": "a"} for i in range(60)]
    items += [{"id": f"b{i}", "category": "b"} for i in range(30)]
    items += [{"id": f"c{i}", "category": "c"} for i in range(10)]
    sample = stratified_sample(items, 20, seed=0)
    assert Counter(i["category"] for i in sample) == {"a": 12, "b": 6, "c": 2}
    positions = [items.index(i) for i in sample]
    assert positions == sorted(positions)
    assert sample == stratified_sample(items, 20, seed=0)
    assert sample != stratified_sample(items, 20, seed=1)
    # Largest remainder: 7 of (60, 30, 10) is 4.2, 2.1, 0.7 → 4, 2, 1.
    assert Counter(i["category"] for i in stratified_sample(items, 7, 0)) == {
        "a": 4,
        "b": 2,
        "c": 1,
    }


def _snapshot(client: Any, model: Path, suites: list[Any]) -> Any:
    return client.post("/evaluations", json={"model": {"path": str(model)}, "suites": suites})


def test_a_sampled_reference_runs_a_registered_derived_suite(
    client: Any, tiny_model_dir: Path
) -> None:
    first = _snapshot(client, tiny_model_dir, ["general-qa@sample=21"])
    assert first.status_code == 202, first.text
    (suite,) = first.json()["suites"]
    assert suite["name"] == "general-qa.sample-21" and suite["item_count"] == 21
    definition = client.get("/suites/general-qa.sample-21").json()["definition"]
    assert "general-qa@" in definition["description"]
    # The same reference is the same suite version (and so the same cache key).
    again = _snapshot(client, tiny_model_dir, ["general-qa@sample=21"]).json()["suites"][0]
    assert (again["version"], again["content_hash"]) == (suite["version"], suite["content_hash"])
    other = _snapshot(client, tiny_model_dir, ["general-qa@sample=21,seed=3"]).json()
    assert other["suites"][0]["name"] == "general-qa.sample-21.seed-3"


@pytest.mark.parametrize(
    "ref, status, words",
    [
        ("general-qa@sample=100000", 422, "must be an integer from 1 to 50000"),
        ("general-qa@sample=5000", 422, "is not smaller than the suite's 252 items"),
        ("general-qa@shots=2", 422, "suites of kind 'qa' take no few-shot examples"),
        ("hellaswag", 422, "run `forgetguard benchmarks pull hellaswag`"),
        ("forgetting-standard", 422, "benchmark 'hellaswag' is not pulled here"),
    ],
)
def test_references_that_cannot_run_are_refused_and_nothing_is_queued(
    client: Any, tiny_model_dir: Path, ref: str, status: int, words: str
) -> None:
    response = _snapshot(client, tiny_model_dir, [ref])
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]
    assert client.get("/evaluations").json()["data"] == []


def _bench(name: str, n: int) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "mc_benchmark",
        "description": f"{name}, written by the test",
        "conventions": {"lm-eval": {"target_delimiter": " ", "metric": "acc"}},
        "default_convention": "lm-eval",
        "items": [
            {
                "id": f"{name}-{i}",
                "category": "x" if i % 2 else "y",
                "gold": i % 2,
                "renderings": {"lm-eval": {"context": f"Q{i}?", "choices": ["yes", "no"]}},
            }
            for i in range(n)
        ],
    }


def test_pulled_benchmarks_register_on_first_use_and_a_group_runs_them_all(
    client: Any, settings: Settings, tiny_model_dir: Path
) -> None:
    settings.benchmarks_dir.mkdir(parents=True)
    for name in ("hellaswag", "arc-challenge", "winogrande"):
        (settings.benchmarks_dir / f"{name}.json").write_text(json.dumps(_bench(name, 30)))
    response = _snapshot(client, tiny_model_dir, ["forgetting-standard@sample=10"])
    assert response.status_code == 202, response.text
    names = [s["name"] for s in response.json()["suites"]]
    assert names == ["hellaswag.sample-10", "arc-challenge.sample-10", "winogrande.sample-10"]
    listed = {s["name"]: s for s in client.get("/suites").json()["data"]}
    assert listed["hellaswag"]["item_count"] == 30
    # A client suite may not take a benchmark's or a group's name.
    for name in ("winogrande", "forgetting-standard"):
        refused = client.post("/suites", json={**_bench(name, 2), "name": name})
        assert refused.status_code == 409 and "reserved" in refused.text


def test_a_convention_option_scores_the_other_peer_s_way(client: Any, tiny_model_dir: Path) -> None:
    bench = {**_bench("mybench", 4), "default_convention": "lm-eval"}
    assert client.post("/suites", json=bench).status_code == 201
    refused = _snapshot(client, tiny_model_dir, ["mybench@convention=lighteval"])
    assert refused.status_code == 422
    assert "convention 'lighteval' is not one of the suite's (lm-eval)" in refused.json()["detail"]
    shots = _snapshot(client, tiny_model_dir, ["mybench@shots=2"]).json()["suites"][0]
    assert shots["name"] == "mybench.2shot"
