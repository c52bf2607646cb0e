"""Tests for app.stats (scipy is used only here, as an independent reference)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from scipy.stats import binomtest

from app.stats.statistics import (
    mcnemar_exact,
    noninferiority_pass,
    paired_bootstrap_ci,
    paired_counts,
    summarize,
)


def _pairs(both_correct: int, forgotten: int, learned: int, both_wrong: int):
    """Build before/after lists with the given 2x2 table (order is irrelevant)."""
    before = [True] * both_correct + [True] * forgotten + [False] * learned + [False] * both_wrong
    after = [True] * both_correct + [False] * forgotten + [True] * learned + [False] * both_wrong
    return before, after


# ---------------------------------------------------------------- McNemar


MCNEMAR_CASES = [
    (0, 0),
    (0, 1),
    (1, 0),
    (0, 5),
    (5, 0),
    (1, 1),
    (2, 7),
    (10, 10),
    (10, 11),
    (1, 30),
    (20, 0),
    (17, 3),
    (200, 150),
    (150, 200),
    (499, 501),
    (3000, 2900),
    (1, 1500),
    (40, 2000),
    (50300, 49700),
    (49000, 51000),
    (100000, 0),
]


@pytest.mark.parametrize(("b", "c"), MCNEMAR_CASES)
def test_mcnemar_matches_scipy_binomtest(b: int, c: int) -> None:
    got = mcnemar_exact(b, c)
    if b + c == 0:
        assert got == 1.0
        return
    want = binomtest(min(b, c), b + c, 0.5, alternative="two-sided").pvalue
    assert math.isclose(got, want, rel_tol=1e-9, abs_tol=0.0), (b, c, got, want)


@pytest.mark.parametrize(("b", "c"), MCNEMAR_CASES)
def test_mcnemar_symmetric_and_in_unit_interval(b: int, c: int) -> None:
    p = mcnemar_exact(b, c)
    assert p == mcnemar_exact(c, b)
    assert 0.0 <= p <= 1.0


def test_mcnemar_known_values() -> None:
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(10, 10) == 1.0
    # n = 20, all discordant pairs one way: p = 2 / 2**20.
    assert math.isclose(mcnemar_exact(20, 0), 2.0 / 2**20, rel_tol=1e-12)
    assert mcnemar_exact(20, 0) < 0.01
    # n = 5, min = 0: p = 2 / 32.
    assert math.isclose(mcnemar_exact(0, 5), 0.0625, rel_tol=1e-12)


def test_mcnemar_tiny_p_values_keep_relative_precision() -> None:
    # Exact value from integer arithmetic (Python int / int is correctly rounded).
    b, c = 30, 1200
    n = b + c
    exact = 2 * sum(math.comb(n, k) for k in range(b + 1)) / 2**n
    assert 0.0 < exact < 1e-250
    assert math.isclose(mcnemar_exact(b, c), exact, rel_tol=1e-12)


def test_mcnemar_large_n_is_fast() -> None:
    # CPU time, not wall time: other processes on a busy CI machine must not fail this.
    start = time.process_time()
    for b, c in [(50300, 49700), (49990, 50010), (30000, 70000)]:
        mcnemar_exact(b, c)
    assert time.process_time() - start < 2.0


def test_mcnemar_rejects_negative_counts() -> None:
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 3)


# ------------------------------------------------------------ paired counts


def test_paired_counts_basic() -> None:
    before = [True, True, False, False, True, False, True]
    after = [True, False, True, False, True, False, False]
    assert paired_counts(before, after) == {
        "both_correct": 2,
        "forgotten": 2,
        "learned": 1,
        "both_wrong": 2,
        "n_pairs": 7,
    }


def test_paired_counts_empty_and_numpy_input() -> None:
    assert paired_counts([], []) == {
        "both_correct": 0,
        "forgotten": 0,
        "learned": 0,
        "both_wrong": 0,
        "n_pairs": 0,
    }
    counts = paired_counts(np.array([1, 1, 0], dtype=bool), np.array([0, 1, 1], dtype=bool))
    assert counts == {
        "both_correct": 1,
        "forgotten": 1,
        "learned": 1,
        "both_wrong": 0,
        "n_pairs": 3,
    }
    assert all(type(v) is int for v in counts.values())


def test_paired_counts_length_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        paired_counts([True, False], [True])
    with pytest.raises(ValueError):
        paired_bootstrap_ci([True], [True, False])


# ---------------------------------------------------------------- bootstrap


def _reference_bootstrap(before, after, *, confidence: float, n_resamples: int, seed: int):
    """Slow, literal paired bootstrap: resample item indices with replacement."""
    b = np.asarray(before, dtype=float)
    a = np.asarray(after, dtype=float)
    n = b.size
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_resamples, n))
    drops = b[idx].mean(axis=1) - a[idx].mean(axis=1)
    alpha = 1.0 - confidence
    low, high = np.quantile(drops, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def test_bootstrap_same_seed_is_reproducible() -> None:
    before, after = _pairs(50, 12, 5, 33)
    first = paired_bootstrap_ci(before, after, seed=123)
    second = paired_bootstrap_ci(before, after, seed=123)
    assert first == second


def test_bootstrap_different_seed_differs() -> None:
    before, after = _pairs(500, 120, 50, 330)
    results = {paired_bootstrap_ci(before, after, n_resamples=2000, seed=s) for s in range(5)}
    assert len(results) > 1


def test_bootstrap_identical_outcomes_give_zero_interval() -> None:
    before = [True, False, True, True, False] * 40
    assert paired_bootstrap_ci(before, list(before)) == (0.0, 0.0)


def test_bootstrap_empty_gives_zero_interval() -> None:
    assert paired_bootstrap_ci([], []) == (0.0, 0.0)


def test_bootstrap_clear_collapse_excludes_zero() -> None:
    n = 200
    before = [True] * n
    after = [i % 10 == 0 for i in range(n)]  # 90% forgotten
    low, high = paired_bootstrap_ci(before, after)
    assert 0.0 < low <= 0.9 <= high <= 1.0


def test_bootstrap_improvement_gives_negative_interval() -> None:
    # Sign convention: drop = before - after, so learning gives a negative drop.
    before, after = _pairs(40, 2, 30, 28)
    low, high = paired_bootstrap_ci(before, after)
    assert low <= high < 0.0


@pytest.mark.parametrize(
    ("table", "confidence"),
    [
        ((25, 15, 3, 17), 0.95),
        ((10, 8, 8, 34), 0.90),
        ((30, 5, 12, 13), 0.99),
    ],
)
def test_bootstrap_matches_literal_resampling(table, confidence: float) -> None:
    before, after = _pairs(*table)
    assert len(before) == 60
    fast = paired_bootstrap_ci(before, after, confidence=confidence, n_resamples=20000, seed=7)
    slow = _reference_bootstrap(before, after, confidence=confidence, n_resamples=4000, seed=11)
    assert fast[0] == pytest.approx(slow[0], abs=0.03), (fast, slow)
    assert fast[1] == pytest.approx(slow[1], abs=0.03), (fast, slow)


def test_bootstrap_is_independent_of_item_order() -> None:
    before, after = _pairs(25, 15, 3, 17)
    perm = np.random.default_rng(3).permutation(len(before))
    shuffled = paired_bootstrap_ci([before[i] for i in perm], [after[i] for i in perm])
    assert shuffled == paired_bootstrap_ci(before, after)


def test_bootstrap_higher_confidence_is_wider() -> None:
    before, after = _pairs(300, 60, 30, 110)
    lo50, hi50 = paired_bootstrap_ci(before, after, confidence=0.5)
    lo99, hi99 = paired_bootstrap_ci(before, after, confidence=0.99)
    assert lo99 < lo50 < hi50 < hi99


def test_bootstrap_rejects_bad_arguments() -> None:
    before, after = _pairs(5, 1, 1, 3)
    with pytest.raises(ValueError):
        paired_bootstrap_ci(before, after, confidence=1.0)
    with pytest.raises(ValueError):
        paired_bootstrap_ci(before, after, confidence=0.0)
    with pytest.raises(ValueError):
        paired_bootstrap_ci(before, after, n_resamples=0)


def test_bootstrap_is_fast_for_10k_items() -> None:
    rng = np.random.default_rng(0)
    before = rng.random(10_000) < 0.8
    after = np.where(rng.random(10_000) < 0.9, before, ~before)
    start = time.perf_counter()
    low, high = paired_bootstrap_ci(before, after, n_resamples=10_000, seed=0)
    elapsed = time.perf_counter() - start
    print(f"paired_bootstrap_ci: 10,000 pairs x 10,000 resamples in {elapsed * 1000:.1f} ms")
    assert low < high
    assert elapsed < 1.0


# ------------------------------------------------------- non-inferiority


def test_noninferiority_pass_is_strict() -> None:
    assert noninferiority_pass(0.01, 0.02) is True
    assert noninferiority_pass(0.02, 0.02) is False
    assert noninferiority_pass(0.05, 0.02) is False
    assert noninferiority_pass(-0.1, 0.0) is True
    assert noninferiority_pass(float("nan"), 0.02) is False


# ---------------------------------------------------------------- summarize


def test_summarize_fields() -> None:
    before, after = _pairs(50, 12, 4, 34)
    result = summarize(before, after, seed=1)
    assert set(result) == {
        "mcnemar_p_value",
        "drop_ci95",
        "n_pairs",
        "forgotten",
        "learned",
        "drop",
    }
    assert result["n_pairs"] == 100
    assert result["forgotten"] == 12
    assert result["learned"] == 4
    assert result["drop"] == pytest.approx(np.mean(before) - np.mean(after))
    assert result["drop"] == pytest.approx(0.08)
    assert result["mcnemar_p_value"] == pytest.approx(binomtest(4, 16, 0.5).pvalue, rel=1e-9)
    assert result["drop_ci95"] == list(paired_bootstrap_ci(before, after, seed=1))
    low, high = result["drop_ci95"]
    assert low <= result["drop"] <= high


def test_summarize_empty() -> None:
    result = summarize([], [])
    assert result == {
        "mcnemar_p_value": 1.0,
        "drop_ci95": [0.0, 0.0],
        "n_pairs": 0,
        "forgotten": 0,
        "learned": 0,
        "drop": 0.0,
    }


def test_holm_adjustment_matches_the_step_down_definition() -> None:
    from app.stats.statistics import holm_adjust

    assert holm_adjust([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm_adjust([]) == []
    assert holm_adjust([0.6, 0.9]) == [1.0, 1.0]


def test_min_detectable_drop_shrinks_with_n_and_is_none_when_nothing_can_be_significant() -> None:
    from app.stats.statistics import min_detectable_drop, smallest_significant_count

    assert smallest_significant_count(0.05) == 6  # 2 * 0.5**6 = 0.031; 2 * 0.5**5 = 0.0625
    assert min_detectable_drop(5, 0.2, alpha=0.05) is None
    sizes = [min_detectable_drop(n, 0.05, alpha=0.05) for n in (20, 100, 1000)]
    assert all(s is not None for s in sizes)
    assert sizes[0] > sizes[1] > sizes[2]  # type: ignore[operator]
    # More discordance (noisier pairs) needs a larger drop to be seen.
    assert min_detectable_drop(1000, 0.3, alpha=0.05) > min_detectable_drop(1000, 0.05, alpha=0.05)  # type: ignore[operator]
