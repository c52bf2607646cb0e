"""KL(base ‖ candidate) from stored top-k next tokens: exact cases and the documented bound."""

from __future__ import annotations

import math

import pytest

from app.stats.kl import position_kl, suite_kl, text_kl


def lps(*ps: float) -> list[float]:
    return [math.log(p) for p in ps]


def full_kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def test_identical_stored_values_give_exactly_zero() -> None:
    ids, values = [3, 1, 7], lps(0.5, 0.3, 0.1)
    assert position_kl(ids, values, ids, values) == (0.0, 0.0)
    top = {"targets": "abc", "ids": [ids, ids], "logprobs": [values, values]}
    assert suite_kl([({"topk": top}, {"topk": dict(top)})]) == {
        "kl_per_token": 0.0,
        "kl_positions": 2,
        "kl_missing_fraction": 0.0,
    }


def test_with_the_whole_vocabulary_stored_it_is_the_exact_kl() -> None:
    p, q = [0.6, 0.3, 0.1], [0.2, 0.5, 0.3]
    kl, missing = position_kl([0, 1, 2], lps(*p), [1, 2, 0], lps(q[1], q[2], q[0]))
    assert kl == pytest.approx(full_kl(p, q)) and missing == 0.0


def test_coarsened_to_top_k_it_is_a_lower_bound_when_no_id_is_missing() -> None:
    p = [0.5, 0.2, 0.1, 0.1, 0.1]
    q = [0.3, 0.3, 0.05, 0.05, 0.3]
    # k = 2: both runs store ids 0 and 1 (q's top-2 are 0, 1 and 4 tie; 0 and 1 kept).
    kl, missing = position_kl([0, 1], lps(0.5, 0.2), [0, 1], lps(0.3, 0.3))
    coarse = full_kl([0.5, 0.2, 0.3], [0.3, 0.3, 0.4])
    assert kl == pytest.approx(coarse) and missing == 0.0
    assert 0.0 < kl <= full_kl(p, q)


def test_a_base_id_missing_from_the_candidate_top_k_uses_the_candidates_kth_probability() -> None:
    # Base top-2: ids 0, 1. Candidate top-2: ids 0, 5 (0.5, 0.2): id 1 has at most 0.2.
    kl, missing = position_kl([0, 1], lps(0.6, 0.3), [0, 5], lps(0.5, 0.2))
    expected = full_kl([0.6, 0.3, 0.1], [0.5, 0.2, 0.3])
    assert kl == pytest.approx(expected) and missing == pytest.approx(0.3)


def test_texts_that_tokenize_differently_or_lack_top_k_omit_kl_with_a_note() -> None:
    a = {"targets": "x", "ids": [[1]], "logprobs": [[0.0]]}
    b = {"targets": "y", "ids": [[1]], "logprobs": [[0.0]]}
    assert text_kl(a, b) is None
    assert suite_kl([({"topk": a}, {"topk": b})])["kl_per_token"] is None
    old = suite_kl([({"nll_sum": 3.0, "tokens": 1}, {"topk": a})])
    assert old["kl_per_token"] is None and "before run stored no top-k" in old["kl_note"]
