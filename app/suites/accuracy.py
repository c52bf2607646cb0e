"""What kinds scored right-or-wrong per item share: accuracy per category, paired statistics.

Pure functions. ``by_category`` is the lesson's per-category accuracy of a run;
``paired_statistics`` compares the same items before and after (McNemar, bootstrap CI, Holm
across categories, power); ``category_findings`` turns its per-category drops into findings
under the comparison rules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from app.stats import statistics as stats
from app.suites.registry import ItemRow, Pairs, Result, finding
from app.suites.rules import CompareOptions

POWER = 0.8  # the power at which min_detectable_drop is stated


def by_category(rows: Sequence[ItemRow]) -> dict[str, dict[str, Any]]:
    """``{category: {"correct", "total", "accuracy"}}`` in the order categories first appear."""
    by_cat: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = by_cat.setdefault(row.category or "general", {"correct": 0, "total": 0})
        entry["correct"] += int(bool(row.passed))
        entry["total"] += 1
    for entry in by_cat.values():
        entry["accuracy"] = entry["correct"] / entry["total"]
    return by_cat


def _summary(pairs: Pairs, options: CompareOptions) -> dict[str, Any]:
    before = [bool(b.passed) for b, _ in pairs]
    after = [bool(a.passed) for _, a in pairs]
    return {
        "accuracy_before": sum(before) / len(pairs),
        "accuracy_after": sum(after) / len(pairs),
        **stats.summarize(
            before,
            after,
            confidence=1.0 - options.alpha,
            n_resamples=options.n_resamples,
            seed=options.seed,
        ),
    }


def _power(summary: dict[str, Any], options: CompareOptions) -> dict[str, Any]:
    n = summary["n_pairs"]
    discordance = (summary["forgotten"] + summary["learned"]) / n if n else 0.0
    return {
        "min_detectable_drop": stats.min_detectable_drop(n, discordance, alpha=options.alpha),
        "noninferiority_floor": stats.noninferiority_floor(n, 1.0 - options.alpha),
    }


def paired_statistics(pairs: Pairs, options: CompareOptions) -> dict[str, Any]:
    """Overall and per-category paired statistics of right/wrong items (``pairs`` not empty)."""
    overall = _summary(pairs, options)
    by_cat = {
        cat: _summary([(b, a) for b, a in pairs if (b.category or "general") == cat], options)
        for cat in dict.fromkeys(b.category or "general" for b, _ in pairs)
    }
    # One test per category is a family of tests: Holm keeps the chance of any false alarm
    # at alpha; the raw p stays beside the adjusted one.
    names = list(by_cat)
    adjusted = stats.holm_adjust([by_cat[c]["mcnemar_p_value"] for c in names])
    for cat, p_holm in zip(names, adjusted, strict=True):
        entry = by_cat[cat]
        entry["p_value"] = entry["mcnemar_p_value"]
        entry["p_value_holm"] = p_holm
        entry["significant"] = entry["drop"] > 0 and p_holm < options.alpha
        entry["min_detectable_drop"] = _power(entry, options)["min_detectable_drop"]
    return {
        **overall,
        **_power(overall, options),
        "alpha": options.alpha,
        "power": POWER,
        "confidence": 1.0 - options.alpha,
        "by_category": by_cat,
    }


def category_findings(
    statistics: Mapping[str, Any], options: CompareOptions
) -> list[dict[str, Any]]:
    """A finding per category whose drop passes the limit; which gate follows the rules."""
    significant_rule = options.category_rule == "significant"
    gating = options.max_category_drop is not None or significant_rule
    limit = (
        options.max_category_drop
        if options.max_category_drop is not None
        else (0.0 if significant_rule else options.threshold)
    )
    found = []
    # Unrounded drops: the rounded category_drops are for display.
    for cat, c in statistics["by_category"].items():
        if c["drop"] <= limit:
            continue
        significance = (
            f"significant after Holm adjustment (p = {c['p_value']:.3g}, "
            f"adjusted {c['p_value_holm']:.3g} < {options.alpha})"
            if c["significant"]
            else f"not significant after Holm adjustment (p = {c['p_value']:.3g}, "
            f"adjusted {c['p_value_holm']:.3g} ≥ {options.alpha})"
        )
        message = (
            f"category {cat!r} dropped {c['drop']:.3f} "
            f"({c['accuracy_before']:.3f} → {c['accuracy_after']:.3f}), more than "
            f"{'max_category_drop ' if options.max_category_drop is not None else ''}{limit}; "
            f"{significance}"
        )
        gates = gating and (c["significant"] or not significant_rule)
        if not gates:
            message += (
                "; reported, does not fail the gate under category_rule=significant"
                if significant_rule
                else "; reported, set max_category_drop to gate on it"
            )
        found.append(finding("category", str(cat), message, gates=gates))
    return found


def accuracy_detail(result: Result) -> str:
    """``"7 of 10 correct"``: the line under an accuracy kind's headline on the dashboard."""
    return f"{result.get('correct')} of {result.get('total')} correct"
