"""Replay: the lesson's create_replay_dataset, reproduced draw for draw; general data sources."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from workers.finetune.replay import (
    SELF_PROMPTS,
    cached_completions,
    create_replay_dataset,
    evaluation_texts,
    exclude_evaluated,
    suite_records,
)

SUITES = Path(__file__).resolve().parents[3] / "app" / "suites" / "data"


def lesson_create_replay_dataset(
    domain_data: list[dict], general_data: list[dict], replay_fraction: float = 0.1, seed: int = 42
) -> list[dict]:
    """The lesson's function verbatim, minus the final ``Dataset.from_list``."""
    random.seed(seed)
    num_replay = int(len(domain_data) * replay_fraction)
    replay_sample = random.sample(general_data, min(num_replay, len(general_data)))
    combined = domain_data + replay_sample
    random.shuffle(combined)
    return combined


DOMAIN = [{"text": f"Q: drug {i}?\nA: answer {i}."} for i in range(83)]
GENERAL = [{"text": f"Q: general {i}?\nA: fact {i}."} for i in range(252)]


@pytest.mark.parametrize("seed", [0, 1, 7, 42, 1234, 2**31 - 1])
@pytest.mark.parametrize("fraction", [0.1, 0.15, 0.5, 1.0, 5.0])
def test_replay_is_identical_to_the_lessons_function(seed: int, fraction: float) -> None:
    ours = create_replay_dataset(DOMAIN, GENERAL, fraction, seed)
    assert ours == lesson_create_replay_dataset(DOMAIN, GENERAL, fraction, seed)
    assert len(ours) - len(DOMAIN) == min(int(len(DOMAIN) * fraction), len(GENERAL))


def test_replay_leaves_the_global_random_state_alone() -> None:
    random.seed(99)
    expected = random.random()
    random.seed(99)
    create_replay_dataset(DOMAIN, GENERAL, 0.5, seed=3)
    assert random.random() == expected


def test_the_lessons_example_arithmetic() -> None:
    # The lesson: replay_fraction=0.15 on its drug data; int() rounds down.
    mixed = create_replay_dataset(DOMAIN, GENERAL, 0.15)
    assert len(mixed) - len(DOMAIN) == 12  # int(83 * 0.15) = int(12.45)
    assert create_replay_dataset(DOMAIN[:6], GENERAL, 0.15) == lesson_create_replay_dataset(
        DOMAIN[:6], GENERAL, 0.15
    )
    assert len(create_replay_dataset(DOMAIN[:6], GENERAL, 0.15)) == 6  # int(0.9) = 0


def test_suite_records_by_kind() -> None:
    qa = json.loads((SUITES / "general-qa.json").read_text())
    records, prompts = suite_records(qa)
    assert records[0] == {
        "prompt": qa["items"][0]["question"],
        "completion": qa["items"][0]["answers"][0],
    }
    assert prompts == []
    checklist = json.loads((SUITES / "forgetting-checklist.json").read_text())
    records, prompts = suite_records(checklist)
    assert records == [] and prompts[0] == "List three countries in Europe."
    text = json.loads((SUITES / "general-text.json").read_text())
    assert suite_records(text)[0][0] == {"text": text["items"][0]["text"]}


def test_records_the_evaluation_scores_are_excluded_from_general_data() -> None:
    qa = json.loads((SUITES / "general-qa.json").read_text())
    evaluated = evaluation_texts([{"kind": "qa", "items": qa["items"][:10]}])
    records, _ = suite_records(qa)
    kept, excluded = exclude_evaluated(records, evaluated)
    assert excluded == 10 and len(kept) == len(records) - 10
    assert not {r["prompt"] for r in kept} & {i["question"] for i in qa["items"][:10]}


def test_when_everything_overlaps_the_records_are_kept_and_the_overlap_reported() -> None:
    records = [{"prompt": "What is the capital of France?", "completion": "Paris"}]
    kept, excluded = exclude_evaluated(records, {"what is the capital of france?"})
    assert kept == records and excluded == -1


def test_self_prompts_are_not_items_of_any_builtin_suite() -> None:
    definitions = [json.loads(p.read_text()) for p in SUITES.glob("*.json")]
    evaluated = evaluation_texts(definitions)
    kept, excluded = exclude_evaluated(
        [{"prompt": p, "completion": "x"} for p in SELF_PROMPTS], evaluated
    )
    assert excluded == 0 and len(SELF_PROMPTS) >= 50


def test_model_answers_are_generated_once_then_cached(tmp_path: Path) -> None:
    calls: list[int] = []

    def generate() -> list[str]:
        calls.append(1)
        return ["a", "b"]

    first: tuple[list[str], Any] = cached_completions(tmp_path, "key", generate)
    second = cached_completions(tmp_path, "key", generate)
    assert first == (["a", "b"], False) and second == (["a", "b"], True)
    assert len(calls) == 1
