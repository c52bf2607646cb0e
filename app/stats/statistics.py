"""Paired before/after statistics for forgetting checks.

A model is evaluated on the same N items before and after a change, giving one
pair of binary outcomes (correct before?, correct after?) per item. The
"drop" is accuracy_before - accuracy_after, so a positive drop means the model
got worse (forgot).

Pure standard library + numpy on purpose: this module runs inside workers and
API processes that should not need scipy (scipy is only used by the tests as
an independent reference).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "holm_adjust",
    "mcnemar_exact",
    "min_detectable_drop",
    "noninferiority_floor",
    "noninferiority_pass",
    "paired_bootstrap_ci",
    "paired_counts",
    "summarize",
]

# Relative size below which the rest of a binomial tail no longer changes a
# float64 sum (2**-60 is comfortably below the 2**-53 unit roundoff).
_TAIL_EPS = 2.0**-60


def mcnemar_exact(forgotten: int, learned: int) -> float:
    """Two-sided exact McNemar p-value on the discordant pairs.

    b = forgotten (correct -> wrong), c = learned (wrong -> correct). Equal to
    the two-sided exact binomial test of min(b, c) with n = b + c, p = 0.5:
    ``min(1, 2 * P(X <= min(b, c)))``. Returns 1.0 when b + c == 0.
    Accurate to ~1e-13 relative for n up to (at least) 100000.
    """
    b = operator.index(forgotten)
    c = operator.index(learned)
    if b < 0 or c < 0:
        raise ValueError(f"counts must be non-negative, got forgotten={b}, learned={c}")
    n = b + c
    if n == 0:
        # No discordant pairs: no evidence of any change.
        return 1.0
    m = min(b, c)
    if 2 * m >= n:
        # b == c: P(X <= n/2) > 1/2, so the doubled tail is capped at 1.
        return 1.0

    # P(X <= m) = C(n, m) / 2**n * sum_{k<=m} C(n, k) / C(n, m).
    # The ratio sum is computed in floats walking down from k = m, where each
    # step multiplies by C(n, k-1)/C(n, k) = k / (n - k + 1) < 1 (since m < n/2),
    # so terms shrink monotonically and nothing can overflow.
    rel = 1.0
    term = 1.0
    for k in range(m, 0, -1):
        ratio = k / (n - k + 1)
        term *= ratio
        rel += term
        # Ratios keep decreasing as k falls, so the remaining tail is bounded
        # by a geometric series: term * ratio / (1 - ratio).
        if term * ratio < rel * _TAIL_EPS * (1.0 - ratio):
            break

    # Leading term C(n, m) / 2**n done exactly in integers and split into
    # mantissa/exponent: 2**n overflows a float for n > 1023, and the lgamma
    # route loses ~1e-10 relative precision at n ~ 1e5.
    top = math.comb(n, m)
    shift = max(top.bit_length() - 64, 0)
    mantissa = float(top >> shift)
    # ldexp applies the (possibly huge negative) exponent last, underflowing
    # gracefully to a subnormal/0.0 only when the true p-value is that small.
    p = math.ldexp(2.0 * mantissa * rel, shift - n)
    return min(1.0, p)


def _as_bool_vector(values: Sequence[bool], name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=bool)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    return arr


def paired_counts(before: Sequence[bool], after: Sequence[bool]) -> dict[str, int]:
    """Count the 2x2 paired table.

    Returns {"both_correct", "forgotten", "learned", "both_wrong", "n_pairs"}.
    Raises ValueError when the sequences differ in length (they must describe
    the same items in the same order).
    """
    if len(before) != len(after):
        raise ValueError(
            f"before and after must have the same length, got {len(before)} and {len(after)}"
        )
    b = _as_bool_vector(before, "before")
    a = _as_bool_vector(after, "after")
    return {
        "both_correct": int(np.count_nonzero(b & a)),
        "forgotten": int(np.count_nonzero(b & ~a)),
        "learned": int(np.count_nonzero(~b & a)),
        "both_wrong": int(np.count_nonzero(~b & ~a)),
        "n_pairs": int(b.size),
    }


def paired_bootstrap_ci(
    before: Sequence[bool],
    after: Sequence[bool],
    *,
    confidence: float = 0.95,
    n_resamples: int = 10000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of the drop, resampling item pairs with replacement.

    Each pair's difference d_i = before_i - after_i is in {-1, 0, +1}, so a
    resample's drop depends only on how many +1/-1 pairs it drew: drawing
    multinomial counts is distributionally identical to resampling indices and
    costs O(n_resamples) instead of O(n * n_resamples). Seeded with
    numpy.random.default_rng(seed). Returns (0.0, 0.0) when there are no pairs.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    counts = paired_counts(before, after)
    n = counts["n_pairs"]
    if n == 0:
        return (0.0, 0.0)

    p_plus = counts["forgotten"] / n
    p_minus = counts["learned"] / n
    # p_zero goes last: numpy derives the final category as the remainder, so
    # float rounding in the three probabilities can never make them invalid.
    p_zero = max(0.0, 1.0 - p_plus - p_minus)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, [p_plus, p_minus, p_zero], size=n_resamples)
    drops = (draws[:, 0] - draws[:, 1]) / n

    alpha = 1.0 - confidence
    low, high = np.quantile(drops, [alpha / 2.0, 1.0 - alpha / 2.0])
    return (float(low), float(high))


def noninferiority_pass(ci_high: float, margin: float) -> bool:
    """True when the CI's upper bound of the drop is strictly below margin.

    A NaN bound compares False and therefore fails, which is the safe outcome.
    """
    return bool(ci_high < margin)


def summarize(
    before: Sequence[bool],
    after: Sequence[bool],
    *,
    confidence: float = 0.95,
    n_resamples: int = 10000,
    seed: int = 0,
) -> dict[str, Any]:
    """All paired statistics for one before/after comparison.

    Returns {"mcnemar_p_value", "drop_ci95": [low, high], "n_pairs",
    "forgotten", "learned", "drop"}; drop = mean(before) - mean(after), 0.0
    when there are no pairs. "drop_ci95" holds the interval at `confidence`.
    """
    counts = paired_counts(before, after)
    n = counts["n_pairs"]
    low, high = paired_bootstrap_ci(
        before, after, confidence=confidence, n_resamples=n_resamples, seed=seed
    )
    # mean(before) - mean(after) == (forgotten - learned) / n: concordant pairs cancel.
    drop = (counts["forgotten"] - counts["learned"]) / n if n else 0.0
    return {
        "mcnemar_p_value": mcnemar_exact(counts["forgotten"], counts["learned"]),
        "drop_ci95": [low, high],
        "n_pairs": n,
        "forgotten": counts["forgotten"],
        "learned": counts["learned"],
        "drop": drop,
    }


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values, in the input order (family-wise error control).

    The i-th smallest p is multiplied by ``m - i`` (i from 0), a running maximum keeps the
    adjusted values monotone, and each is capped at 1. Valid under any dependence.
    """
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def _z(p: float) -> float:
    """The standard normal quantile (inverse CDF) by bisection on ``math.erf``: no scipy."""
    low, high = -10.0, 10.0
    for _ in range(100):
        mid = (low + high) / 2.0
        if 0.5 * (1.0 + math.erf(mid / math.sqrt(2.0))) < p:
            low = mid
        else:
            high = mid
    return (low + high) / 2.0


def smallest_significant_count(alpha: float) -> int:
    """Fewest forgotten items (none learned) whose exact McNemar p is below ``alpha``."""
    k = 1
    while mcnemar_exact(k, 0) >= alpha:
        k += 1
    return k


def min_detectable_drop(
    n: int, discordance: float, *, alpha: float, power: float = 0.8
) -> float | None:
    """Smallest accuracy drop a paired test of ``n`` items detects at ``alpha`` with ``power``.

    Connor's (1987) normal approximation for McNemar's test: a drop d is detectable when
    ``sqrt(n)·d ≥ z(1-α/2)·sqrt(ψ) + z(power)·sqrt(ψ - d²)``, with ψ the share of discordant
    pairs (the observed one, but never below d: a drop of d flips at least d·n items). The
    exact test adds a floor: at least ``smallest_significant_count(alpha)`` items must flip.
    None when no drop up to 1.0 is detectable (a tiny suite).
    """
    if n <= 0:
        return None
    floor = smallest_significant_count(alpha) / n
    if floor > 1.0:
        return None
    z_alpha, z_power = _z(1.0 - alpha / 2.0), _z(power)

    def detectable(d: float) -> bool:
        psi = max(discordance, d)
        return math.sqrt(n) * d >= z_alpha * math.sqrt(psi) + z_power * math.sqrt(
            max(psi - d * d, 0.0)
        )

    if not detectable(1.0):
        return None
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2.0
        if detectable(mid):
            high = mid
        else:
            low = mid
    return max(high, floor)


def noninferiority_floor(n: int, confidence: float = 0.95) -> float:
    """The upper bound of the drop's CI when not one of ``n`` items was forgotten.

    The exact (Clopper–Pearson) upper bound of a share seen 0 times in n, ``1 - (α/2)^(1/n)``:
    no result at this n can show non-inferiority with a margin at or below it.
    """
    if n <= 0:
        return 1.0
    return 1.0 - ((1.0 - confidence) / 2.0) ** (1.0 / n)


def churn(first: Sequence[bool], second: Sequence[bool]) -> int:
    """Items whose outcome differs between two runs of the same model (the noise floor)."""
    counts = paired_counts(first, second)
    return counts["forgotten"] + counts["learned"]
