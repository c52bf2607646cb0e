"""The ``ifeval`` suite kind: upload validation, the driver's generation length, the metrics
and the report-only comparison."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from app.suites.kinds import KINDS
from app.suites.kinds.ifeval import aggregate_ifeval, compare_ifeval, score_ifeval
from app.suites.registry import Row
from app.suites.rules import CompareOptions
from workers.evaluation.scoring import RunSettings, run_items

ITEM = {
    "id": "p1",
    "prompt": "Write two sentences about cats without commas.",
    "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_sentences"],
    "kwargs": [{}, {"num_sentences": 2, "relation": "at least"}],
}
SUITE = {"name": "my-ifeval", "kind": "ifeval", "items": [ITEM]}


def test_upload_is_stored_with_the_default_generation_length(client) -> None:  # type: ignore[no-untyped-def]
    response = client.post("/suites", json=SUITE)
    assert response.status_code == 201, response.text
    assert client.get("/suites/my-ifeval").json()["definition"]["max_new_tokens"] == 1280


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"instruction_id_list": ["punctuation:no_comma", "keywords:vibes"]}, "'keywords:vibes'"),
        ({"kwargs": [{}, {"num_sentences": "2", "relation": "at least"}]}, "num_sentences"),
        ({"kwargs": [{}, {"num_sentences": 2, "relation": "about"}]}, "relation"),
        ({"kwargs": [{}, {"num_sentences": 2, "relation": "at least", "x": 1}]}, "x"),
        ({"kwargs": [{}]}, "one kwargs object per instruction id"),
    ],
)
def test_bad_instructions_are_a_422_naming_the_item_and_nothing_is_created(
    client,  # type: ignore[no-untyped-def]
    change: dict[str, Any],
    says: str,
) -> None:
    good = {**ITEM, "id": "p0"}
    payload = {**SUITE, "items": [good, {**ITEM, **change}]}
    problem = client.post("/suites", json=payload).json()
    assert problem["status"] == 422
    assert problem["errors"][0]["loc"][:3] == ["body", "items", 1]
    assert says in problem["errors"][0]["msg"]
    assert client.get("/suites/my-ifeval").status_code == 404


class RecordingBackend:
    """Answers every prompt with one fixed text and records the generation length asked."""

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.max_new_tokens: list[int] = []

    def generate(
        self,
        prompts: Sequence[Any],
        *,
        max_new_tokens: int,
        stop: Sequence[str] = (),
        on_result: Callable[[int, str], None] | None = None,
    ) -> list[str]:
        self.max_new_tokens.append(max_new_tokens)
        for index in range(len(prompts)):
            if on_result is not None:
                on_result(index, self.answer)
        return [self.answer] * len(prompts)


def test_the_suite_asks_for_its_own_generation_length() -> None:
    backend = RecordingBackend("  Cats purr. Cats nap.  ")
    rows: list[dict[str, Any]] = []
    suite = {**SUITE, "max_new_tokens": 700}
    settings = RunSettings(prompt_format="chat", max_new_tokens=50, stop=())
    run_items("ifeval", backend, suite, [(0, ITEM)], settings, rows.extend)  # type: ignore[arg-type]
    assert backend.max_new_tokens == [700]
    assert rows[0]["passed"] is True
    assert rows[0]["details"]["strict"] == [True, True]
    assert rows[0]["response"] == "Cats purr. Cats nap."


def _row(item_id: str, strict: list[bool], loose: list[bool], suite: str = "s") -> Row:
    return Row(
        item_id,
        all(strict),
        None,
        None,
        None,
        "",
        {"instruction_id_list": ITEM["instruction_id_list"], "strict": strict, "loose": loose},
        suite,
        "ifeval",
        "",
    )


def test_aggregate_gives_lm_evals_four_metrics_and_both_averages() -> None:
    rows = [_row("a", [True, True], [True, True]), _row("b", [True, False], [True, True])]
    result = aggregate_ifeval(rows)
    assert result["prompt_level_strict_acc"] == 0.5
    assert result["inst_level_strict_acc"] == 0.75
    assert result["prompt_level_loose_acc"] == 1.0
    assert result["inst_level_loose_acc"] == 1.0
    assert result["average_strict"] == 0.625
    assert result["average_loose"] == 1.0
    assert result["by_instruction"]["length_constraints:number_sentences"] == {
        "total": 2,
        "strict": 1,
        "loose": 2,
        "strict_acc": 0.5,
        "loose_acc": 1.0,
    }


def test_the_comparison_reports_a_significant_drop_without_failing_the_verdict() -> None:
    before = [_row(str(i), [True, True], [True, True]) for i in range(30)]
    after = [_row(str(i), [True, False], [True, False]) for i in range(30)]
    contribution = compare_ifeval(list(zip(before, after, strict=True)), CompareOptions())
    entry = contribution.body["ifeval"]["s"]
    assert entry["drop"]["prompt_level_strict_acc"] == 1.0
    assert entry["by_instruction"]["length_constraints:number_sentences"]["strict_after"] == 0.0
    assert entry["statistics"]["mcnemar_p_value"] < 0.05
    assert [f["gates"] for f in contribution.findings] == [False]
    assert contribution.reasons == []
    assert compare_ifeval([], CompareOptions()).body == {"ifeval": None}


def test_score_reads_the_stored_item() -> None:
    scored = score_ifeval(ITEM, ["Cats purr, always."], SUITE)
    assert scored["passed"] is False
    assert scored["details"]["strict"] == [False, False]
    assert KINDS["ifeval"].generates


def test_a_pulled_ifeval_registers_on_first_use_and_a_sample_of_it_is_queued(
    client,  # type: ignore[no-untyped-def]
    settings,  # type: ignore[no-untyped-def]
    tiny_model_dir,  # type: ignore[no-untyped-def]
) -> None:
    items = [{**ITEM, "id": str(i)} for i in range(12)]
    pulled = {**SUITE, "name": "ifeval", "description": "a stand-in pulled file", "items": items}
    settings.benchmarks_dir.mkdir(parents=True)
    (settings.benchmarks_dir / "ifeval.json").write_text(json.dumps(pulled))
    response = client.post(
        "/evaluations",
        json={"model": {"path": str(tiny_model_dir)}, "suites": ["ifeval@sample=5"]},
    )
    assert response.status_code == 202, response.text
    derived = client.get("/suites/ifeval.sample-5").json()["definition"]
    assert derived["kind"] == "ifeval" and len(derived["items"]) == 5
    assert derived["max_new_tokens"] == 1280
