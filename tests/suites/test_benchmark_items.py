"""The item format of pulled benchmarks: what a suite must hold for both peers' scoring."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from app.suites.benchmarks.items import (
    MAX_BENCHMARK_ITEMS,
    ChoiceBenchmark,
    ChoiceItem,
    Rendering,
)
from app.suites.schema import MAX_ITEMS

SOURCE = {
    "package": "p",
    "version": "1",
    "wheel": "p-1-py3-none-any.whl",
    "wheel_sha256": "0" * 64,
    "licence": "Apache-2.0",
    "files": ["f"],
    "split": "test",
    "dataset": "d",
    "dataset_licence": "MIT",
}
CONVENTIONS = {
    "lm-eval": {"target_delimiter": " ", "metric": "acc"},
    "lighteval": {"target_delimiter": "", "metric": "acc_norm_nospace"},
}


def item(i: int = 0, **over: Any) -> dict[str, Any]:
    return {
        "id": f"x/{i}",
        "category": "c",
        "gold": 1,
        "renderings": {
            "lm-eval": {"context": "Q?\nAnswer:", "choices": ["a", "b"]},
            "lighteval": {"context": "Q?\nAnswer:", "choices": [" a", " b"]},
        },
        **over,
    }


def suite(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": "bench",
        "description": "d",
        "source": SOURCE,
        "conventions": CONVENTIONS,
        "default_convention": "lighteval",
        "items": items,
    }


def test_partial_scoring_rendering_holds_contexts_and_one_continuation() -> None:
    r = Rendering.model_validate({"contexts": ["A went", "B went"], "continuation": "home."})
    assert r.n_choices == 2


@pytest.mark.parametrize(
    "rendering",
    [
        {"context": "c", "choices": ["a", "b"], "contexts": ["x", "y"], "continuation": "z"},
        {"context": "c"},
        {"contexts": ["x", "y"]},
        {"context": "c", "choices": ["only one"]},
    ],
)
def test_a_rendering_has_exactly_one_shape(rendering: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Rendering.model_validate(rendering)


def test_every_item_carries_each_of_its_suites_conventions_with_the_same_choices() -> None:
    ChoiceItem.model_validate(item())
    one = item(renderings={"lm-eval": item()["renderings"]["lm-eval"]})
    ChoiceItem.model_validate(one)  # an imported lm-eval task has one convention
    with pytest.raises(ValidationError, match=r"items\[1\] \('x/0'\) has renderings for lm-eval"):
        ChoiceBenchmark.model_validate(suite([item(1), one]))
    with pytest.raises(ValidationError, match="default_convention 'lighteval' is not among"):
        ChoiceBenchmark.model_validate(
            {
                **suite([one]),
                "conventions": {"lm-eval": CONVENTIONS["lm-eval"]},
                "default_convention": "lighteval",
            }
        )
    three = {"context": "c", "choices": ["a", "b", "c"]}
    with pytest.raises(ValidationError, match="same number of choices"):
        ChoiceItem.model_validate(item(renderings={**item()["renderings"], "lm-eval": three}))
    with pytest.raises(ValidationError, match="gold 2 is out of range"):
        ChoiceItem.model_validate(item(gold=2))


def test_duplicate_ids_are_refused_with_both_positions() -> None:
    with pytest.raises(ValidationError, match=r"duplicate item id 'x/0' at items\[1\]"):
        ChoiceBenchmark.model_validate(suite([item(0), item(0)]))


def test_a_pulled_suite_may_exceed_the_upload_limit() -> None:
    # MMLU's test split has 14,042 items; uploads keep the kinds' 10,000.
    assert MAX_ITEMS < 14_042 <= MAX_BENCHMARK_ITEMS
    big = ChoiceBenchmark.model_validate(suite([item(i) for i in range(14_042)]))
    assert len(big.items) == 14_042
    with pytest.raises(ValidationError):
        ChoiceBenchmark.model_validate(suite([item(i) for i in range(MAX_BENCHMARK_ITEMS + 1)]))
