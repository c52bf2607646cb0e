"""``app.compare.build`` on synthetic item rows: the verdict's rules, statistics, drift, flips."""

from __future__ import annotations

import math
from typing import Any

import pytest

from app.comparison.verdict import build, comparability_problems
from app.stats import statistics as stats
from app.suites.kinds.qa import compare_forgetting
from app.suites.registry import Row
from app.suites.rules import CompareOptions

RUN_A = {"id": "ev_a"}
RUN_B = {"id": "ev_b"}


def qa(
    item_id: str,
    passed: bool,
    *,
    category: str = "geography",
    response: str | None = None,
    suite: str = "general-qa",
) -> Row:
    """A qa item row as the worker stores it."""
    return Row(
        item_id=item_id,
        passed=passed,
        score=float(passed),
        category=category,
        severity=None,
        response=response if response is not None else f"answer {item_id}",
        details={"question": f"question {item_id}?", "answers": ["x"]},
        suite=suite,
        kind="qa",
        prompt=f"Question: question {item_id}?\nAnswer:",
    )


def check(item_id: str, passed: bool, severity: str, behaviour: str | None = None) -> Row:
    """A checklist item row (of a ``behaviour`` when given, as the scorer records it)."""
    details = {"test": f"Test {item_id}"}
    if behaviour is not None:
        details["behaviour"] = behaviour
    return Row(
        item_id=item_id,
        passed=passed,
        score=float(passed),
        category="general",
        severity=severity,
        response=f"response {item_id}",
        details=details,
        suite="forgetting-checklist",
        kind="checklist",
        prompt="List three countries.",
    )


def text(item_id: str, nll_sum: float, tokens: int) -> Row:
    """A perplexity item row (score = NLL per token)."""
    return Row(
        item_id=item_id,
        passed=None,
        score=nll_sum / tokens,
        category="general",
        severity=None,
        response=None,
        details={"nll_sum": nll_sum, "tokens": tokens},
        suite="general-text",
        kind="perplexity",
        prompt="",
    )


def qa_rows(outcomes: list[bool], **kwargs: Any) -> list[Row]:
    return [qa(f"q{i:03d}", ok, **kwargs) for i, ok in enumerate(outcomes)]


def test_lesson_keys_are_the_lessons_compare_forgetting() -> None:
    before = qa_rows([True] * 8 + [False] * 2)
    after = qa_rows([True] * 6 + [False] * 4)
    body = build(RUN_A, RUN_B, before, after, CompareOptions())
    lesson = compare_forgetting(
        {"overall_accuracy": 0.8, "by_category": {"geography": {"accuracy": 0.8}}},
        {"overall_accuracy": 0.6, "by_category": {"geography": {"accuracy": 0.6}}},
    )
    assert {k: body[k] for k in lesson} == lesson
    assert body["accuracy_drop"] == 0.2 and body["catastrophic_forgetting_detected"] is True
    assert body["recommendation"] == "Reduce learning rate and epochs, or switch to LoRA"
    assert body["verdict"] == "fail" and "more than the threshold 0.1" in body["reasons"][0]


def test_same_run_twice_has_p_value_one_no_flips_and_says_so() -> None:
    rows = qa_rows([True, False, True, True, False])
    body = build(RUN_A, RUN_A, rows, rows, CompareOptions())
    assert body["statistics"]["mcnemar_p_value"] == 1.0
    assert body["statistics"]["drop_ci95"] == [0.0, 0.0]
    assert body["flips"] == {"forgotten": [], "learned": []}
    assert body["same_run"] is True and "itself" in body["note"]
    assert body["verdict"] == "pass" and body["reasons"] == []


def test_cached_copy_compared_with_its_source_is_called_the_same_run() -> None:
    rows = qa_rows([True, False])
    body = build(
        {"id": "ev_src", "source": "ev_src"},
        {"id": "ev_copy", "source": "ev_src"},
        rows,
        rows,
        CompareOptions(),
    )
    assert body["same_run"] is True and "cached copy" in body["note"]
    assert "note" not in build(RUN_A, RUN_B, rows, rows, CompareOptions())


def test_collapse_is_significant_with_ci_above_zero_and_lists_forgotten_responses() -> None:
    before = qa_rows([True] * 20 + [False] * 5)
    after = [qa(r.item_id, False, response="drug drug drug") for r in before]
    body = build(RUN_A, RUN_B, before, after, CompareOptions())
    stats = body["statistics"]
    assert stats["forgotten"] == 20 and stats["learned"] == 0 and stats["n_pairs"] == 25
    assert stats["mcnemar_p_value"] == pytest.approx(2 * 0.5**20)
    assert stats["drop_ci95"][0] > 0
    forgotten = body["flips"]["forgotten"]
    assert len(forgotten) == 20 and body["flips"]["learned"] == []
    assert forgotten[0] == {
        "suite": "general-qa",
        "item_id": "q000",
        "category": "geography",
        "question": "question q000?",
        "answers": ["x"],
        "response_before": "answer q000",
        "response_after": "drug drug drug",
    }
    assert body["verdict"] == "fail"


def test_mcnemar_uses_only_discordant_pairs() -> None:
    # 5 forgotten, 1 learned, 94 unchanged: exact two-sided p = 2 * P(X <= 1 | n=6) = 0.21875.
    before = qa_rows([True] * 5 + [False] + [True] * 50 + [False] * 44)
    after = qa_rows([False] * 5 + [True] + [True] * 50 + [False] * 44)
    stats = build(RUN_A, RUN_B, before, after, CompareOptions())["statistics"]
    assert stats["mcnemar_p_value"] == pytest.approx(0.21875)
    assert stats["drop"] == pytest.approx(0.04)


def test_bootstrap_ci_is_seeded_and_reproducible() -> None:
    before = qa_rows([True, False] * 30)
    after = qa_rows([True, True, False, False] * 15)
    first = build(RUN_A, RUN_B, before, after, CompareOptions())["statistics"]
    again = build(RUN_A, RUN_B, before, after, CompareOptions())["statistics"]
    assert first["drop_ci95"] == again["drop_ci95"]
    expected = stats.paired_bootstrap_ci(
        [bool(r.passed) for r in before], [bool(r.passed) for r in after], seed=0
    )
    assert first["drop_ci95"] == list(expected)
    low, high = first["drop_ci95"]
    assert low < first["drop"] < high


def test_alpha_sets_the_confidence_of_the_interval() -> None:
    before = qa_rows([True, False] * 30)
    after = qa_rows([True, True, False, False] * 15)
    wide = build(RUN_A, RUN_B, before, after, CompareOptions(alpha=0.01))["statistics"]
    narrow = build(RUN_A, RUN_B, before, after, CompareOptions(alpha=0.2))["statistics"]
    assert wide["confidence"] == 0.99 and narrow["confidence"] == pytest.approx(0.8)
    width = lambda s: s["drop_ci95"][1] - s["drop_ci95"][0]  # noqa: E731
    assert width(wide) > width(narrow)


def test_noninferiority_fails_a_small_drop_measured_on_too_few_items() -> None:
    # Point drop 0.05 (< threshold 0.1) on 20 items: the CI's upper bound reaches past 0.1.
    before = qa_rows([True] * 10 + [False] * 10)
    after = qa_rows([False] + [True] * 9 + [False] * 10)
    threshold_mode = build(RUN_A, RUN_B, before, after, CompareOptions())
    noninferiority = build(RUN_A, RUN_B, before, after, CompareOptions(mode="noninferiority"))
    assert threshold_mode["verdict"] == "pass"
    assert noninferiority["statistics"]["drop_ci95"][1] >= 0.1
    assert noninferiority["verdict"] == "fail"
    # 20 items cannot show non-inferiority at a 0.1 margin at all: even with nothing forgotten
    # the exact upper bound of the drop is 0.168; the verdict and a warning both say so.
    assert noninferiority["reasons"][0].startswith("non-inferiority cannot be shown at n = 20")
    assert any(
        w["code"] == "underpowered" and w["scope"] == "noninferiority"
        for w in noninferiority["warnings"]
    )


def test_noninferiority_passes_when_many_items_pin_the_drop_below_the_margin() -> None:
    before = qa_rows([True] * 500 + [False] * 500)
    after = qa_rows([False] * 5 + [True] * 495 + [True] * 5 + [False] * 495)
    body = build(RUN_A, RUN_B, before, after, CompareOptions(mode="noninferiority"))
    assert body["statistics"]["drop_ci95"][1] < 0.1
    assert body["verdict"] == "pass"


def test_max_category_drop_fails_one_collapsed_category_the_overall_drop_hides() -> None:
    before = qa_rows([True] * 40, category="geography") + [
        qa(f"s{i}", True, category="science") for i in range(4)
    ]
    after = qa_rows([True] * 40, category="geography") + [
        qa(f"s{i}", i >= 2, category="science") for i in range(4)
    ]
    lenient = build(RUN_A, RUN_B, before, after, CompareOptions())
    strict = build(RUN_A, RUN_B, before, after, CompareOptions(max_category_drop=0.2))
    assert lenient["accuracy_drop"] < 0.1 and lenient["verdict"] == "pass"
    assert lenient["category_drops"] == {"geography": 0.0, "science": 0.5}
    assert strict["verdict"] == "fail"
    assert strict["reasons"] == [
        "category 'science' dropped 0.500 (1.000 → 0.500), more than max_category_drop 0.2; "
        "not significant after Holm adjustment (p = 0.5, adjusted 1 ≥ 0.05)"
    ]
    by_cat = strict["statistics"]["by_category"]
    assert by_cat["science"]["forgotten"] == 2 and by_cat["geography"]["forgotten"] == 0
    assert by_cat["science"]["accuracy_after"] == 0.5


def test_a_critical_check_that_newly_fails_fails_the_verdict() -> None:
    before = [
        check("c1", True, "critical"),
        check("c2", True, "high"),
        check("c3", False, "critical"),
    ]
    after = [
        check("c1", False, "critical"),
        check("c2", True, "high"),
        check("c3", False, "critical"),
    ]
    body = build(RUN_A, RUN_B, before, after, CompareOptions())
    checklist = body["checklist"]
    assert checklist["score_before"] == pytest.approx(2 / 3)
    assert checklist["score_after"] == pytest.approx(1 / 3)
    assert [f["item_id"] for f in checklist["newly_failing"]] == ["c1"]
    assert checklist["newly_failing"][0]["severity"] == "critical"
    # One item decides: the lesson's rule still fails it, and the reason says how little it is.
    assert body["verdict"] == "fail" and body["reasons"] == [
        "critical check 'Test c1' passed before and fails after (1 item; low evidence)"
    ]
    assert [(i["item_id"], i["passed_before"], i["passed_after"]) for i in checklist["items"]] == [
        ("c1", True, False),
        ("c2", True, True),
        ("c3", False, False),
    ]


def behaviour_rows(
    name: str, before: int, after: int, n: int, *, learned: int = 0, severity: str = "critical"
) -> tuple[list[Row], list[Row]]:
    """``n`` items of one behaviour: ``before`` pass before; ``learned`` of the failing ones
    newly pass and enough of the passing ones newly fail that ``after`` pass after."""
    forgotten = before - after + learned
    outcomes = [(True, i >= forgotten) for i in range(before)]
    outcomes += [(False, i < learned) for i in range(n - before)]
    rows = [
        (check(f"{name}-{i}", b, severity, name), check(f"{name}-{i}", a, severity, name))
        for i, (b, a) in enumerate(outcomes)
    ]
    return [b for b, _ in rows], [a for _, a in rows]


def test_one_flip_of_a_behaviour_asked_eight_ways_is_reported_not_failed() -> None:
    before, after = behaviour_rows("Basic instruction following", 8, 7, 8)
    body = build(RUN_A, RUN_B, before, after, CompareOptions())
    assert body["verdict"] == "pass" and body["reasons"] == []
    [group] = body["checklist"]["behaviours"]
    assert (group["n_items"], group["passed_before"], group["passed_after"]) == (8, 8, 7)
    assert group["drop"] == pytest.approx(1 / 8) and group["p_value"] == 1.0
    [reported] = body["findings"]
    assert not reported["gates"]
    assert reported["message"] == (
        "critical behaviour 'Basic instruction following' fell from 8/8 to 7/8 (p = 1): "
        "reported, not significant at α = 0.05 and not more than max_behaviour_drop "
        f"{CompareOptions().max_behaviour_drop}"
    )
    assert body["headline"] == "PASS: no forgetting rule failed; 1 finding reported, not gated"


def test_a_behaviour_fails_on_a_drop_larger_than_the_rule_book_allows() -> None:
    before, after = behaviour_rows("Multi-step reasoning", 6, 2, 8)
    body = build(RUN_A, RUN_B, before, after, CompareOptions())
    assert body["reasons"] == [
        "critical behaviour 'Multi-step reasoning' fell from 6/8 to 2/8 (p = 0.12): a drop of "
        f"0.50, more than max_behaviour_drop {CompareOptions().max_behaviour_drop}"
    ]
    # The same drop under a more tolerant rule book is reported, not failed.
    assert (
        build(RUN_A, RUN_B, before, after, CompareOptions(max_behaviour_drop=0.5))["verdict"]
        == "pass"
    )


def test_a_significant_drop_smaller_than_the_size_rule_still_fails() -> None:
    # 40 items, 8 lost and none gained: a drop of 0.2 with p = 2 * 0.5**8 = 0.0078.
    before, after = behaviour_rows("Refuses", 40, 32, 40)
    body = build(RUN_A, RUN_B, before, after, CompareOptions(max_behaviour_drop=0.3))
    assert body["reasons"] == [
        "critical behaviour 'Refuses' fell from 40/40 to 32/40 (p = 0.0078): significant at "
        "α = 0.05"
    ]
    assert stats.mcnemar_exact(8, 0) == pytest.approx(0.0078125)


def test_flips_both_ways_are_netted_before_the_rate_is_judged() -> None:
    # 3 items newly fail and 2 newly pass: the rate falls by one item in eight.
    before, after = behaviour_rows("Basic instruction following", 5, 4, 8, learned=2)
    body = build(RUN_A, RUN_B, before, after, CompareOptions())
    [group] = body["checklist"]["behaviours"]
    assert (group["forgotten"], group["learned"]) == (3, 2)
    assert body["verdict"] == "pass" and "fell from 5/8 to 4/8" in body["findings"][0]["message"]


def test_where_one_item_decides_a_behaviour_the_reason_says_so() -> None:
    before, after = behaviour_rows("Pair", 2, 1, 2)
    body = build(RUN_A, RUN_B, before, after, CompareOptions())
    assert body["reasons"] == [
        "critical behaviour 'Pair' fell from 2/2 to 1/2 (p = 1): a drop of 0.50, more than "
        f"max_behaviour_drop {CompareOptions().max_behaviour_drop}; one item decides; low evidence"
    ]


def test_a_non_critical_behaviour_that_falls_is_reported() -> None:
    before, after = behaviour_rows("Format", 8, 0, 8, severity="high")
    body = build(RUN_A, RUN_B, before, after, CompareOptions())
    assert body["verdict"] == "pass"
    assert body["findings"][0]["message"] == (
        "high behaviour 'Format' fell from 8/8 to 0/8 (p = 0.0078) (reported; only critical "
        "checks fail the gate)"
    )


def test_a_non_critical_check_that_newly_fails_is_reported_but_passes() -> None:
    before = [check("c1", True, "high"), check("c2", True, "low")]
    after = [check("c1", False, "high"), check("c2", False, "low")]
    body = build(RUN_A, RUN_B, before, after, CompareOptions())
    assert [f["severity"] for f in body["checklist"]["newly_failing"]] == ["high", "low"]
    assert body["verdict"] == "pass"
    assert body["overall_accuracy_before"] is None  # no qa suite: nothing on accuracy


def test_drift_reports_nll_per_token_change_and_gates_only_when_asked() -> None:
    before = [text("t1", 30.0, 10), text("t2", 40.0, 10)]  # 3.5 per token
    after = [text("t1", 60.0, 10), text("t2", 40.0, 10)]  # 5.0 per token
    body = build(RUN_A, RUN_B, before, after, CompareOptions())
    suite = body["drift"]["suites"]["general-text"]
    assert suite["nll_per_token_before"] == pytest.approx(3.5)
    assert suite["nll_per_token_after"] == pytest.approx(5.0)
    assert suite["relative_change"] == pytest.approx(1.5 / 3.5)
    assert suite["largest_increases"][0]["item_id"] == "t1"
    assert body["verdict"] == "pass"
    gated = build(RUN_A, RUN_B, before, after, CompareOptions(max_nll_increase=0.2))
    assert gated["verdict"] == "fail"
    assert "NLL/token on 'general-text' rose 42.9%" in gated["reasons"][0]


def test_drift_normalises_each_run_by_its_own_token_count() -> None:
    before = [text("t1", 30.0, 10)]
    after = [text("t1", 36.0, 12)]  # another tokenizer: more tokens, same 3.0 per token
    suite = build(RUN_A, RUN_B, before, after, CompareOptions())["drift"]["suites"]["general-text"]
    assert suite["nll_per_token_after"] == pytest.approx(3.0)
    assert suite["change"] == pytest.approx(0.0)


def with_topk(row: Row, first: float) -> Row:
    """``row`` with stored top-2 next tokens: probability ``first`` on id 1, 0.1 on id 2."""
    positions = int((row.details or {})["tokens"])
    top = {
        "k": 2,
        "targets": "same",
        "ids": [[1, 2]] * positions,
        "logprobs": [[math.log(first), math.log(0.1)]] * positions,
    }
    row.details = {**(row.details or {}), "topk": top}
    return row


def test_kl_to_base_sits_beside_nll_drift_and_gates_only_when_asked() -> None:
    base = [with_topk(text("t1", 30.0, 10), 0.8)]
    same = build(RUN_A, RUN_A, base, base, CompareOptions(max_kl=0.0))
    assert same["drift"]["kl_per_token"] == 0.0 and same["verdict"] == "pass"
    assert same["drift"]["nll"]["relative_change"] == 0.0
    mild = [with_topk(text("t1", 31.0, 10), 0.7)]
    harsh = [with_topk(text("t1", 40.0, 10), 0.3)]
    kl_mild = build(RUN_A, RUN_B, base, mild, CompareOptions())["drift"]
    kl_harsh = build(RUN_A, RUN_B, base, harsh, CompareOptions())["drift"]
    expected = 0.8 * math.log(0.8 / 0.7) + 0.1 * math.log(0.1 / 0.1) + 0.1 * math.log(0.1 / 0.2)
    assert kl_mild["kl_per_token"] == pytest.approx(expected)
    assert kl_mild["suites"]["general-text"]["kl_positions"] == 9 + 1
    assert 0.0 < kl_mild["kl_per_token"] < kl_harsh["kl_per_token"]
    gated = build(RUN_A, RUN_B, base, harsh, CompareOptions(max_kl=0.1))
    assert gated["verdict"] == "fail"
    assert any(
        r.startswith("KL(base ‖ candidate) on 'general-text' is") and "max_kl 0.1" in r
        for r in gated["reasons"]
    )


def test_runs_without_stored_top_k_compare_with_kl_omitted() -> None:
    old = [text("t1", 30.0, 10)]
    new = [with_topk(text("t1", 31.0, 10), 0.7)]
    body = build(RUN_A, RUN_B, old, new, CompareOptions(max_kl=0.01))
    drift = body["drift"]
    assert drift["kl_per_token"] is None and "no top-k" in drift["kl_note"]
    assert drift["suites"]["general-text"]["nll_per_token_after"] == pytest.approx(3.1)
    assert body["verdict"] == "pass"  # KL unavailable is reported, not a failure
    assert any(f["rule"] == "drift" and not f["gates"] for f in body["findings"])


def test_no_perplexity_suite_means_no_drift() -> None:
    rows = qa_rows([True])
    assert build(RUN_A, RUN_B, rows, rows, CompareOptions())["drift"] is None


def snapshot(**overrides: Any) -> dict[str, Any]:
    run = {
        "suites": [
            {"name": "general-qa", "version": 1, "content_hash": "sha256:aaa"},
            {"name": "my-qa", "version": 1, "content_hash": "sha256:bbb"},
        ],
        "prompt_format": "chat",
        "generation": {"max_new_tokens": 50, "stop": []},
    }
    run.update(overrides)
    return run


def test_identical_runs_are_comparable() -> None:
    assert comparability_problems(snapshot(), snapshot()) == []


def test_another_suite_version_is_named_with_both_versions() -> None:
    after = snapshot(
        suites=[
            {"name": "general-qa", "version": 1, "content_hash": "sha256:aaa"},
            {"name": "my-qa", "version": 2, "content_hash": "sha256:ccc"},
        ]
    )
    assert comparability_problems(snapshot(), after) == [
        "suite 'my-qa' differs: version 1 before, version 2 after (content hashes differ)"
    ]


def test_prompt_format_generation_and_missing_suites_are_each_named() -> None:
    after = snapshot(
        suites=[{"name": "general-qa", "version": 1, "content_hash": "sha256:aaa"}],
        prompt_format="plain",
        generation={"max_new_tokens": 20, "stop": []},
    )
    assert comparability_problems(snapshot(), after) == [
        "suite 'my-qa' ran only in the before evaluation",
        "pass suites=general-qa to compare the suites both runs share",
        "prompt_format differs: 'chat' before, 'plain' after",
        "generation settings differ: max_new_tokens 50 before, 20 after",
    ]


def test_a_five_item_suite_is_underpowered_and_a_250_item_one_is_not() -> None:
    # One flipped answer out of 5: the gate's threshold cannot be told from noise at this n.
    small = build(
        RUN_A, RUN_B, qa_rows([True] * 5), qa_rows([False] + [True] * 4), CompareOptions()
    )
    assert small["verdict"] == "fail" and small["statistics"]["mcnemar_p_value"] == 1.0
    [warning] = [w for w in small["warnings"] if w["code"] == "underpowered"]
    assert warning["message"].startswith(
        "underpowered: n = 5 cannot distinguish a 0.10 drop from noise"
    )
    # Even 5 of 5 forgotten gives exact p = 0.0625: no drop is detectable at n = 5.
    assert warning["min_detectable_drop"] is None
    assert small["statistics"]["min_detectable_drop"] is None

    large = build(
        RUN_A,
        RUN_B,
        qa_rows([True] * 200 + [False] * 50),
        qa_rows([False] * 5 + [True] * 195 + [False] * 50),
        CompareOptions(),
    )
    mdd = large["statistics"]["min_detectable_drop"]
    assert mdd is not None and 0.02 < mdd < 0.10
    assert large["warnings"] == []

    forty = build(
        RUN_A, RUN_B, qa_rows([True] * 40), qa_rows([False] * 2 + [True] * 38), CompareOptions()
    )
    [warning] = forty["warnings"]
    mdd = forty["statistics"]["min_detectable_drop"]
    assert mdd is not None and mdd > 0.10
    assert (
        f"the minimum detectable drop at α = 0.05 with 80% power is {mdd:.3f}"
        in (warning["message"])
    )


def test_noninferiority_is_shown_on_enough_items_and_refused_on_too_few() -> None:
    before = qa_rows([True] * 300)
    after = qa_rows([False] + [True] * 299)
    body = build(RUN_A, RUN_B, before, after, CompareOptions(mode="noninferiority"))
    assert body["verdict"] == "pass" and body["statistics"]["noninferiority_floor"] < 0.1
    wide = build(
        RUN_A,
        RUN_B,
        before,
        qa_rows([False] * 25 + [True] * 275),
        CompareOptions(mode="noninferiority"),
    )
    assert wide["reasons"][-1].startswith("non-inferiority not shown: the 95% CI of the drop")
    tiny = build(
        RUN_A,
        RUN_B,
        qa_rows([True] * 5),
        qa_rows([True] * 5),
        CompareOptions(mode="noninferiority"),
    )
    assert tiny["verdict"] == "fail"
    assert any(
        w["scope"] == "noninferiority" and "cannot pass at n = 5" in w["message"]
        for w in tiny["warnings"]
    )


def test_category_rule_significant_gates_only_on_holm_adjusted_significance() -> None:
    before = qa_rows([True] * 30, category="geography") + [
        qa(f"s{i}", True, category="science") for i in range(30)
    ]
    after = qa_rows([False] * 12 + [True] * 18, category="geography") + [
        qa(f"s{i}", i >= 3, category="science") for i in range(30)
    ]
    point = build(
        RUN_A, RUN_B, before, after, CompareOptions(threshold=0.5, max_category_drop=0.05)
    )
    significant = build(
        RUN_A,
        RUN_B,
        before,
        after,
        CompareOptions(threshold=0.5, max_category_drop=0.05, category_rule="significant"),
    )
    by_cat = point["statistics"]["by_category"]
    assert by_cat["geography"]["significant"] and not by_cat["science"]["significant"]
    assert by_cat["science"]["p_value_holm"] >= by_cat["science"]["p_value"]
    assert [r.split(" dropped")[0] for r in point["reasons"]] == [
        "category 'geography'",
        "category 'science'",
    ]
    assert "not significant after Holm adjustment" in point["reasons"][1]
    assert [r.split(" dropped")[0] for r in significant["reasons"]] == ["category 'geography'"]
    [reported] = [f for f in significant["findings"] if not f["gates"]]
    assert reported["subject"] == "science" and "category_rule=significant" in reported["message"]


def test_forgotten_items_within_the_noise_floor_are_flagged() -> None:
    base = qa_rows([True] * 50)
    rerun = qa_rows([False, False, False] + [True] * 47)
    after = qa_rows([False, True, False] + [True] * 47)
    body = build(RUN_A, RUN_B, base, after, CompareOptions(), noise_rows=("ev_rerun", rerun))
    assert body["noise_floor"]["churn"] == 3 and body["noise_floor"]["evaluation"] == "ev_rerun"
    assert any(w["code"] == "within_noise_floor" for w in body["warnings"])
    quiet = build(RUN_A, RUN_B, base, after, CompareOptions(), noise_rows=("ev_rerun", base))
    assert quiet["noise_floor"]["churn"] == 0
    assert not any(w["code"] == "within_noise_floor" for w in quiet["warnings"])


def test_batch_size_alone_does_not_make_runs_incomparable() -> None:
    rerun = snapshot(generation={"max_new_tokens": 50, "stop": [], "batch_size": 3})
    assert comparability_problems(snapshot(), rerun) == []
