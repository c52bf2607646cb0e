"""The ``gen_benchmark`` kind (GSM8K): lm-eval's prompts, stop strings, extraction and metric.

Extraction is pinned to what lm-evaluation-harness 0.4.13's own filters and ``exact_match``
returned on the same responses (``benchmarks/results/gsm8k_agreement.json``, written by
``benchmarks/gsm8k_agreement.py`` in an lm-eval venv), so CI checks agreement without lm-eval.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from app.core.schemas import GenerationSettings
from app.suites.benchmarks.items import GSM8K_UNTIL
from app.suites.kinds import KINDS, validate_suite
from app.suites.kinds.gen_benchmark import exact_match, extract, fewshot_examples
from app.suites.registry import ItemRow, Row
from app.suites.rules import CompareOptions
from app.suites.schema import MAX_NEW_TOKENS
from workers.evaluation.scoring import RunSettings, run_items

AGREEMENT = Path(__file__).parents[2] / "benchmarks" / "results" / "gsm8k_agreement.json"
KIND = KINDS["gen_benchmark"]


def _suite(n: int = 12, **settings: Any) -> dict[str, Any]:
    items = [
        {
            "id": str(k),
            "category": "gsm8k",
            "question": f"What is {k} + {k}?",
            "answer": f"{k} + {k} = <<{k}+{k}={2 * k}>>{2 * k}\n#### {2 * k}",
            "target": str(2 * k),
        }
        for k in range(n)
    ]
    fixed = [{"question": f"Fixed {k}?", "answer": f"So the answer is {k}."} for k in range(8)]
    raw = {
        "name": "gsm8k-test",
        "kind": "gen_benchmark",
        "description": "test",
        "fixed_fewshot": fixed,
        "items": items,
        **settings,
    }
    return validate_suite(raw).model_dump(mode="json")


@pytest.mark.parametrize("case", json.loads(AGREEMENT.read_text())["cases"], ids=lambda c: c["id"])
def test_extraction_matches_lm_eval_0_4_13(case: dict[str, Any]) -> None:
    filtered = extract(case["response"])
    assert filtered == case["lmeval"]["filtered"]
    assert {
        name: exact_match(value, case["reference"]) for name, value in filtered.items()
    } == case["lmeval"]["exact_match"]


def test_stored_lm_eval_outputs_cover_the_tricky_cases() -> None:
    stored = json.loads(AGREEMENT.read_text())
    assert stored["lmeval_version"] == "0.4.13"
    assert stored["until"] == list(GSM8K_UNTIL)
    cases = {c["id"]: c["lmeval"] for c in stored["cases"]}
    # The fallback, first vs last match, and each ignore-regex really occur.
    invalid = {"strict-match": "[invalid]", "flexible-extract": "[invalid]"}
    assert cases["no-number"]["filtered"] == invalid
    assert cases["several-hashes"]["filtered"] == {"strict-match": "3", "flexible-extract": "4"}
    assert cases["comma-thousands"]["exact_match"]["strict-match"] is True
    assert cases["dollar-flexible"]["exact_match"]["flexible-extract"] is True
    assert cases["trailing-period-strict"]["exact_match"]["strict-match"] is True


def test_prompt_is_lm_eval_gsm8k_with_the_suite_examples() -> None:
    suite = _suite(num_fewshot=2, fewshot_source="fixed")
    (request,) = KIND.requests(suite["items"][3], suite, "plain")
    assert request.text == (
        "Question: Fixed 0?\nAnswer: So the answer is 0.\n\n"
        "Question: Fixed 1?\nAnswer: So the answer is 1.\n\n"
        "Question: What is 3 + 3?\nAnswer:"
    )
    assert request.stop == ("Question:", "</s>", "<|im_end|>")
    # Chat: the same text is the one user turn.
    assert KIND.requests(suite["items"][3], suite, "chat")[0].text == request.text


def test_drawn_examples_are_seeded_never_the_item_and_end_with_the_answer() -> None:
    suite = _suite(num_fewshot=5)
    for item in suite["items"]:
        shots = fewshot_examples(item, suite)
        assert len(shots) == 5
        assert item["question"] not in [q for q, _ in shots]
        assert all("\n#### " in a for _, a in shots)
    again = _suite(num_fewshot=5)
    other_seed = _suite(num_fewshot=5, fewshot_seed=7)
    item = suite["items"][4]
    assert fewshot_examples(item, again) == fewshot_examples(item, suite)
    assert any(
        fewshot_examples(i, other_seed) != fewshot_examples(i, suite) for i in suite["items"]
    )


def test_few_shot_settings_are_checked() -> None:
    with pytest.raises(ValidationError, match="exceeds the 8 fixed_fewshot"):
        _suite(num_fewshot=9, fewshot_source="fixed")
    with pytest.raises(ValidationError, match="needs more than 3 items"):
        _suite(n=3, num_fewshot=3)
    with pytest.raises(ValidationError):
        _suite(max_new_tokens=MAX_NEW_TOKENS + 1)
    # The suite's bound is the evaluation's.
    (bound,) = [
        getattr(m, "le", None)
        for m in GenerationSettings.model_fields["max_new_tokens"].metadata
        if hasattr(m, "le")
    ]
    assert bound == MAX_NEW_TOKENS


def test_score_reports_both_filters_and_passes_on_the_headline() -> None:
    suite = _suite()
    item = suite["items"][9]  # answer 18
    row = KIND.score(item, ["9 + 9 = 18. So the answer is 18."], suite)
    assert row["details"]["filtered"] == {"strict-match": "[invalid]", "flexible-extract": "18."}
    assert row["details"]["exact_match"] == {"strict-match": False, "flexible-extract": True}
    assert row["passed"] is True
    strict = _suite(headline="strict-match")
    assert KIND.score(item, ["So the answer is 18."], strict)["passed"] is False
    assert KIND.score(item, ["#### 18"], strict)["passed"] is True


def _rows(suite: dict[str, Any], responses: list[str], name: str = "gsm8k-test") -> list[Row]:
    out = []
    for item, response in zip(suite["items"], responses, strict=True):
        scored = KIND.score(item, [response], suite)
        out.append(
            Row(
                item["id"],
                scored["passed"],
                scored["score"],
                scored["category"],
                None,
                response,
                scored["details"],
                name,
                "gen_benchmark",
                "",
            )
        )
    return out


def test_aggregate_has_both_metrics_overall_and_by_category() -> None:
    suite = _suite(n=4, num_fewshot=0)
    rows = _rows(suite, ["#### 0", "The answer is 2", "#### 5", "nothing"])
    result = KIND.aggregate([ItemRow.of(r) for r in rows])
    assert result["exact_match"] == {"strict-match": 0.25, "flexible-extract": 0.5}
    assert result["overall_accuracy"] == 0.5 and result["headline"] == "flexible-extract"
    assert result["by_category"]["gsm8k"]["exact_match"]["strict-match"] == 0.25
    assert result["exact_match_stderr"]["strict-match"] == pytest.approx(0.25)
    assert KIND.display.detail(result) == "2 of 4 · strict-match 25.0% · flexible-extract 50.0%"


def test_a_drop_beyond_the_threshold_fails_the_verdict() -> None:
    suite = _suite(n=10)
    right = [f"#### {2 * k}" for k in range(10)]
    wrong = right[:5] + ["no idea"] * 5
    before, after = _rows(suite, right), _rows(suite, wrong)
    contribution = KIND.compare(list(zip(before, after, strict=True)), CompareOptions())
    part = contribution.body["gen_benchmark"]
    assert part["exact_match_before"]["strict-match"] == 1.0
    assert part["exact_match_after"]["flexible-extract"] == 0.5
    assert len(part["flips"]["forgotten"]) == 5
    assert contribution.reasons and "exact_match dropped 0.500" in contribution.reasons[0]
    same = KIND.compare(list(zip(before, before, strict=True)), CompareOptions())
    assert same.reasons == []
    assert KIND.compare([], CompareOptions()).body == {}


class _Recorder:
    """A backend that answers every prompt with a fixed text and records how it was asked."""

    name = "recorder"

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def generate(
        self, prompts: Any, *, max_new_tokens: int, stop: Any = (), on_result: Any = None
    ) -> list[str]:
        self.calls.append({"n": len(prompts), "max_new_tokens": max_new_tokens, "stop": stop})
        for i in range(len(prompts)):
            on_result(i, " #### 2\n")
        return [" #### 2\n"] * len(prompts)


def test_the_driver_applies_the_suite_max_new_tokens_and_until() -> None:
    suite = _suite(n=6, max_new_tokens=300)
    backend = _Recorder()
    rows: list[dict[str, Any]] = []
    settings = RunSettings(prompt_format="plain", max_new_tokens=50, stop=("\n\n",))
    pending = list(enumerate(suite["items"]))
    run_items("gen_benchmark", backend, suite, pending, settings, rows.extend)  # type: ignore[arg-type]
    assert backend.calls == [
        {"n": 6, "max_new_tokens": 300, "stop": ("\n\n", "Question:", "</s>", "<|im_end|>")}
    ]
    assert [r["passed"] for r in rows] == [False, True, False, False, False, False]
    assert rows[0]["prompt"].endswith("Question: What is 0 + 0?\nAnswer:")
    assert rows[0]["response"] == "#### 2"
