"""The domain block and the learning–forgetting outcome (pure)."""

from __future__ import annotations

import math

import pytest

from app.comparison.learned import OUTCOMES, domain_block, nll_summary, outcome, outcome_line


def test_nll_summary_weighs_by_tokens() -> None:
    summary = nll_summary([(10.0, 5), (2.0, 5)])
    assert summary["nll_per_token"] == pytest.approx(1.2)
    assert (summary["tokens"], summary["records"]) == (10, 2)
    assert nll_summary([])["nll_per_token"] is None


def test_a_fall_of_held_out_nll_is_learning_with_paired_statistics() -> None:
    before = nll_summary([(20.0, 10), (30.0, 10), (25.0, 10)])
    after = nll_summary([(10.0, 10), (12.0, 10), (26.0, 10)])
    block = domain_block(held_out=(before, after), suites=None, min_gain=0.05)
    assert block["before"]["nll_per_token"] == pytest.approx(2.5)
    assert block["after"]["nll_per_token"] == pytest.approx(1.6)
    assert block["gain"]["nll_per_token"] == pytest.approx(0.9)
    assert block["gain"]["relative_nll"] == pytest.approx(0.36)
    assert block["learned"] is True
    stats = block["held_out"]["statistics"]
    assert stats["n_pairs"] == 3 and stats["improved"] == 2
    low, high = stats["gain_ci95"]
    assert low <= 0.9 <= high and not math.isnan(low)


def test_too_small_a_gain_is_not_learning_and_accuracy_counts_too() -> None:
    before = nll_summary([(20.0, 10)])
    after = nll_summary([(19.5, 10)])  # 2.5 % lower: under min_gain
    block = domain_block(held_out=(before, after), suites=None, min_gain=0.05)
    assert block["learned"] is False
    suites = {"overall_accuracy_before": 0.2, "overall_accuracy_after": 0.6, "statistics": {}}
    both = domain_block(held_out=(before, after), suites=suites, min_gain=0.05)
    assert both["gain"]["accuracy"] == pytest.approx(0.4) and both["learned"] is True
    assert both["before"]["accuracy"] == 0.2 and both["after"]["accuracy"] == 0.6
    assert domain_block(held_out=None, suites=None, min_gain=0.05)["learned"] is None


@pytest.mark.parametrize(
    ("learned", "passed", "expected"),
    [
        (True, True, "learned_and_kept"),
        (True, False, "learned_but_forgot"),
        (False, True, "did_not_learn"),
        (False, False, "neither"),
        (None, True, None),
    ],
)
def test_the_four_outcomes(learned: bool | None, passed: bool, expected: str | None) -> None:
    assert outcome(learned=learned, passed=passed) == expected
    if expected is not None:
        assert expected in OUTCOMES


def test_the_outcome_line_says_the_numbers() -> None:
    block = domain_block(
        held_out=(nll_summary([(20.0, 10)]), nll_summary([(10.0, 10)])), suites=None, min_gain=0.05
    )
    line = outcome_line("learned_but_forgot", block)
    assert (
        line == "learned the domain but forgot general abilities (held-out NLL/token 2.000 → 1.000)"
    )
