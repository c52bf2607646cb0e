"""The mc_benchmark kind: requests as each peer builds them, every metric, the comparison."""

from __future__ import annotations

from typing import Any

import pytest

from app.suites.kinds import KINDS, validate_suite
from app.suites.kinds.mc_benchmark import ask_benchmark, compare_benchmarks, score_benchmark
from app.suites.registry import ItemRow, Row
from app.suites.rules import CompareOptions

CONVENTIONS = {
    "lm-eval": {"target_delimiter": " ", "metric": "acc"},
    "lighteval": {"target_delimiter": "", "metric": "acc_norm_nospace"},
}


def item(i: int, gold: int = 0, category: str = "c", **renderings: Any) -> dict[str, Any]:
    return {
        "id": f"q{i}",
        "category": category,
        "gold": gold,
        "renderings": renderings
        or {
            "lm-eval": {"context": f"Question: q{i}?\nAnswer:", "choices": [f"a{i}", f"b{i}"]},
            "lighteval": {
                "description": "Intro.\n",
                "context": f"Question: q{i}?\nAnswer:",
                "choices": [f" a{i}", f" b{i}"],
            },
        },
    }


def suite(items: list[dict[str, Any]], **over: Any) -> dict[str, Any]:
    definition = {
        "name": "bench",
        "kind": "mc_benchmark",
        "description": "d",
        "conventions": CONVENTIONS,
        "default_convention": "lm-eval",
        "items": items,
        **over,
    }
    return validate_suite(definition).model_dump(mode="json")


def test_plain_requests_put_the_target_delimiter_before_each_choice() -> None:
    s = suite([item(0)])
    requests = ask_benchmark(s["items"][0], s, "plain")
    assert [(r.text, r.continuation) for r in requests] == [
        ("Question: q0?\nAnswer:", " a0"),
        ("Question: q0?\nAnswer:", " b0"),
    ]
    light = suite([item(0)], default_convention="lighteval")
    requests = ask_benchmark(light["items"][0], light, "plain")
    assert [(r.text, r.continuation) for r in requests] == [
        ("Intro.\nQuestion: q0?\nAnswer:", " a0"),
        ("Intro.\nQuestion: q0?\nAnswer:", " b0"),
    ]


def test_in_chat_the_choice_is_the_reply_without_a_delimiter() -> None:
    s = suite([item(0)])
    assert [r.continuation for r in ask_benchmark(s["items"][0], s, "chat")] == ["a0", "b0"]


def test_partial_scoring_asks_each_context_with_the_shared_continuation() -> None:
    wino = item(0, gold=1, **{"lm-eval": {"contexts": ["A won", "B won"], "continuation": "it."}})
    s = suite([wino], conventions={"lm-eval": CONVENTIONS["lm-eval"]})
    requests = ask_benchmark(s["items"][0], s, "plain")
    assert [(r.text, r.continuation) for r in requests] == [("A won", " it."), ("B won", " it.")]
    scored = score_benchmark(s["items"][0], [(-3.0, False), (-1.0, True)], s)
    assert scored["passed"] and scored["response"] == "B won"


def test_few_shot_first_n_from_a_pool_of_its_own() -> None:
    pool = [item(100 + i, gold=1) for i in range(3)]
    s = suite(
        [item(0)],
        num_fewshot=2,
        fewshot={"split": "dev", "sampler": "first_n", "items": pool},
    )
    (first, _) = ask_benchmark(s["items"][0], s, "plain")
    assert first.text == (
        "Question: q100?\nAnswer: b100\n\nQuestion: q101?\nAnswer: b101\n\nQuestion: q0?\nAnswer:"
    )


def test_few_shot_random_draws_are_seeded_per_item_and_never_the_item_itself() -> None:
    items = [item(i) for i in range(6)]
    s = suite(items, num_fewshot=5, fewshot={"split": "validation", "sampler": "random"})
    for it in s["items"]:
        text = ask_benchmark(it, s, "plain")[0].text
        asked = text.split("\n\n")
        assert asked[-1] == it["renderings"]["lm-eval"]["context"]
        assert len(asked) == 6 and all(f"Question: {it['id']}?" not in a for a in asked[:-1])
    # The same item gets the same examples whatever runs beside it.
    alone = suite(items, num_fewshot=5, fewshot={"split": "validation", "sampler": "random"})
    assert ask_benchmark(alone["items"][3], alone, "plain") == ask_benchmark(
        s["items"][3], s, "plain"
    )
    other = suite(
        items, num_fewshot=2, fewshot_seed=7, fewshot={"split": "validation", "sampler": "random"}
    )
    seeds = {ask_benchmark(other["items"][i], other, "plain")[0].text for i in range(6)}
    assert len(seeds) > 1


def test_each_metric_normalises_as_its_peer_does() -> None:
    # lm-eval: acc_norm divides by characters, acc_bytes by UTF-8 bytes; lighteval's nospace
    # drops a leading space. "é" is one character and two bytes.
    it = item(
        0,
        gold=0,
        **{
            "lm-eval": {"context": "c", "choices": ["éé", "ab"]},
            "lighteval": {"context": "c", "choices": [" éé", " abc"]},
        },
    )
    s = suite([it])
    lls = [(-2.1, False), (-2.0, True)]
    details = score_benchmark(s["items"][0], lls, s)["details"]
    # acc: -2.0 wins (choice 1). acc_norm: -1.05 vs -1.0 (1). acc_bytes: -0.525 vs -1.0 (0).
    assert details["pred"] == {"acc": 1, "acc_norm": 1, "acc_bytes": 0, "acc_norm_nospace": 1}
    light = suite([it], default_convention="lighteval")
    scored = score_benchmark(light["items"][0], lls, light)
    # nospace: -2.1/2 = -1.05 vs -2.0/3 = -0.667 → choice 1; lighteval reports it.
    assert scored["details"]["metric"] == "acc_norm_nospace" and scored["passed"] is False
    assert scored["details"]["pred"]["acc_norm_nospace"] == 1


def test_ties_go_to_the_first_choice_as_numpy_argmax() -> None:
    s = suite([item(0, gold=1)])
    scored = score_benchmark(s["items"][0], [(-1.0, True), (-1.0, True)], s)
    assert scored["details"]["pred"]["acc"] == 0 and not scored["passed"]


def _row(suite_name: str, i: int, passed: bool, category: str = "c") -> Row:
    details = {"metric": "acc", "convention": "lm-eval", "correct": {"acc": passed}}
    return Row(f"q{i}", passed, 0.0, category, None, "", details, suite_name, "mc_benchmark", "")


def test_aggregate_reports_every_metric_and_the_reported_one() -> None:
    rows: list[ItemRow] = [_row("b", i, i < 3) for i in range(4)]
    result = KINDS["mc_benchmark"].aggregate(rows)
    assert result["metric"] == "acc" and result["overall_accuracy"] == result["acc"] == 0.75
    assert result["by_category"]["c"] == {"correct": 3, "total": 4, "accuracy": 0.75}


def test_the_comparison_reports_each_benchmark_and_their_mean() -> None:
    pairs = [(_row("hellaswag", i, True), _row("hellaswag", i, i % 2 == 0)) for i in range(40)]
    pairs += [(_row("winogrande", i, i < 20), _row("winogrande", i, i < 20)) for i in range(40)]
    contribution = compare_benchmarks(pairs, CompareOptions(threshold=0.1, n_resamples=200))
    part = contribution.body["benchmarks"]
    assert part["suites"]["hellaswag"]["accuracy_after"] == 0.5
    assert part["suites"]["winogrande"]["drop"] == 0.0
    assert part["mean"] == {
        "suites": ["hellaswag", "winogrande"],
        "accuracy_before": 0.75,
        "accuracy_after": 0.5,
        "drop": 0.25,
    }
    assert part["suites"]["hellaswag"]["statistics"]["n_pairs"] == 40
    # hellaswag dropped 0.5 > 0.1: it fails the verdict, and says so with its statistics.
    assert len(contribution.reasons) == 1
    assert contribution.reasons[0].startswith("hellaswag acc dropped 0.500 (1.000 → 0.500, n = 40")


@pytest.mark.parametrize("threshold, gates", [(0.1, False), (0.01, True)])
def test_a_small_significant_drop_is_reported_unless_it_passes_the_threshold(
    threshold: float, gates: bool
) -> None:
    pairs = [(_row("arc", i, True), _row("arc", i, i >= 12)) for i in range(200)]
    contribution = compare_benchmarks(pairs, CompareOptions(threshold=threshold, n_resamples=200))
    (found,) = contribution.findings
    assert found["gates"] is gates and found["subject"] == "arc"
