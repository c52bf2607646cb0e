"""What a fine-tune learned, beside what it forgot. Pure functions: numbers in, a dict out.

The general verdict says whether the model was broken; the domain block says whether it was
specialized at all: NLL per token on held-out completions of the job's own dataset (records
it never trained on) and accuracy on the user's domain suites, before and after. Together
they give the outcome: ``learned_and_kept`` | ``learned_but_forgot`` | ``did_not_learn`` |
``neither``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from app.stats.kl import suite_kl

OUTCOMES = ("learned_and_kept", "learned_but_forgot", "did_not_learn", "neither")


def nll_summary(
    per_record: Sequence[tuple[float, int]],
    topk: Sequence[Mapping[str, Any] | None] | None = None,
) -> dict[str, Any]:
    """``{"nll_per_token", "tokens", "records", "per_record"}`` from ``(nll sum, tokens)`` pairs,
    plus ``topk`` (the records' stored top-k next tokens, for KL to base) when given."""
    total = sum(s for s, _ in per_record)
    tokens = sum(n for _, n in per_record)
    out: dict[str, Any] = {
        "nll_per_token": total / tokens if tokens else None,
        "tokens": tokens,
        "records": len(per_record),
        "per_record": [[round(s, 6), n] for s, n in per_record],
    }
    kept = [t for t in topk or () if t is not None]
    if kept:
        out["topk"] = kept
    return out


def _gain_ci(
    before: Sequence[Sequence[float]],
    after: Sequence[Sequence[float]],
    *,
    n_resamples: int = 10000,
    seed: int = 0,
) -> tuple[float, float]:
    """95 % paired-bootstrap CI of the fall of token-weighted NLL/token (records resampled)."""
    b = np.array([[s, n] for s, n in before], dtype=float)
    a = np.array([[s, n] for s, n in after], dtype=float)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(b), size=(n_resamples, len(b)))
    tokens = b[picks, 1].sum(axis=1)
    tokens[tokens == 0] = 1.0
    gains = (b[picks, 0].sum(axis=1) - a[picks, 0].sum(axis=1)) / tokens
    low, high = np.quantile(gains, [0.025, 0.975])
    return float(low), float(high)


def held_out_kl(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """KL(base ‖ candidate) per token on the held-out completions, from their stored top-k.

    How far the fine-tune moved the model's predictions on the domain prompts (large is
    expected: that is the learning); ``kl_note`` says why there is none.
    """
    b, a = before.get("topk"), after.get("topk")
    if not b or not a or len(b) != len(a):
        return {
            "kl_per_token": None,
            "kl_note": "no top-k next tokens were stored for the held-out records of both runs",
        }
    return suite_kl([({"topk": x}, {"topk": y}) for x, y in zip(b, a, strict=True)])


def held_out_block(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """Before/after NLL per token on the held-out records, the gain and paired statistics."""
    b, a = before.get("nll_per_token"), after.get("nll_per_token")
    out: dict[str, Any] = {
        "records": before.get("records"),
        "before": {"nll_per_token": b, "tokens": before.get("tokens")},
        "after": {"nll_per_token": a, "tokens": after.get("tokens")},
        "gain": None,
        "statistics": None,
    }
    if b is None or a is None:
        return out
    out["gain"] = {"nll_per_token": b - a, "relative": (b - a) / b if b else None}
    out |= held_out_kl(before, after)
    pb, pa = before.get("per_record") or [], after.get("per_record") or []
    if pb and len(pb) == len(pa):
        improved = sum(
            1 for (sb, nb), (sa, na) in zip(pb, pa, strict=True) if nb and na and sa / na < sb / nb
        )
        low, high = _gain_ci(pb, pa)
        out["statistics"] = {"n_pairs": len(pb), "improved": improved, "gain_ci95": [low, high]}
    return out


def domain_block(
    *,
    held_out: tuple[Mapping[str, Any], Mapping[str, Any]] | None,
    suites: Mapping[str, Any] | None,
    min_gain: float,
) -> dict[str, Any]:
    """The comparison's ``domain``: ``before``, ``after``, ``gain`` and whether it ``learned``.

    ``held_out`` is the before/after :func:`nll_summary`; ``suites`` the ``/compare`` body of
    the domain-suite evaluations. Learned: the held-out NLL per token fell by at least
    ``min_gain`` (relative), or domain accuracy rose by at least ``min_gain`` (absolute).
    """
    before: dict[str, Any] = {}
    after: dict[str, Any] = {}
    gain: dict[str, Any] = {}
    out: dict[str, Any] = {}
    signals: list[bool] = []
    if held_out is not None:
        block = held_out_block(*held_out)
        out["held_out"] = block
        before["nll_per_token"] = block["before"]["nll_per_token"]
        after["nll_per_token"] = block["after"]["nll_per_token"]
        # How far predictions on the domain prompts moved from the base's (KL per token).
        out["kl_per_token"] = block.get("kl_per_token")
        if block["gain"] is not None:
            gain["nll_per_token"] = block["gain"]["nll_per_token"]
            gain["relative_nll"] = block["gain"]["relative"]
            if block["gain"]["relative"] is not None:
                signals.append(block["gain"]["relative"] >= min_gain)
    if suites is not None:
        acc_b = suites.get("overall_accuracy_before")
        acc_a = suites.get("overall_accuracy_after")
        out["suites"] = {
            "accuracy_before": acc_b,
            "accuracy_after": acc_a,
            "statistics": suites.get("statistics"),
        }
        before["accuracy"], after["accuracy"] = acc_b, acc_a
        if acc_b is not None and acc_a is not None:
            gain["accuracy"] = acc_a - acc_b
            signals.append(acc_a - acc_b >= min_gain)
    learned = any(signals) if signals else None
    return {
        "before": before,
        "after": after,
        "gain": gain,
        "learned": learned,
        "min_gain": min_gain,
        **out,
    }


def outcome(*, learned: bool | None, passed: bool) -> str | None:
    """One of :data:`OUTCOMES`; None when nothing measured the learning."""
    if learned is None:
        return None
    if learned:
        return "learned_and_kept" if passed else "learned_but_forgot"
    return "did_not_learn" if passed else "neither"


def outcome_line(name: str | None, domain: Mapping[str, Any]) -> str | None:
    """The outcome in one sentence a reader can act on."""
    if name is None:
        return None
    parts = []
    gain = domain.get("gain") or {}
    if gain.get("relative_nll") is not None:
        b = domain["before"]["nll_per_token"]
        a = domain["after"]["nll_per_token"]
        parts.append(f"held-out NLL/token {b:.3f} → {a:.3f}")
    if gain.get("accuracy") is not None:
        parts.append(
            f"domain accuracy {domain['before']['accuracy']:.2f} → "
            f"{domain['after']['accuracy']:.2f}"
        )
    measured = "; ".join(parts)
    text = {
        "learned_and_kept": "learned the domain and kept its general abilities",
        "learned_but_forgot": "learned the domain but forgot general abilities",
        "did_not_learn": "kept its general abilities but did not learn the domain",
        "neither": "did not learn the domain and forgot general abilities",
    }[name]
    return f"{text} ({measured})" if measured else text
