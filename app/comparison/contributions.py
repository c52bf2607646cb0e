"""What the before/after comparison computes for each suite kind. Pure functions: pairs in.

Each suite kind's registry entry (``app.suites.kinds.KINDS``) names one ``compare_*`` function
here; ``app.comparison.verdict.build`` calls it with the kind's paired rows, merges its
``body`` into the ``/compare`` body and its ``reasons`` into the verdict. A function is called
even when no suite of its kind ran (no pairs), so the body always carries its keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from app.comparison import statistics as stats
from app.comparison.kl import suite_kl
from app.suites.aggregates import ItemRow, aggregate_qa

SEVERITY_ORDER = {"critical": 0, "high": 1, "medium": 2, "low": 3}
LARGEST_NLL_INCREASES = 5
POWER = 0.8  # the power at which min_detectable_drop is stated


@dataclass(frozen=True)
class CompareOptions:
    """The verdict's rules; defaults are the lesson's (drop > 0.10 is forgetting)."""

    threshold: float = 0.10
    max_category_drop: float | None = None
    max_nll_increase: float | None = None
    # Fail when mean KL(base ‖ candidate) per token on a perplexity suite exceeds this (nats).
    max_kl: float | None = None
    mode: Literal["threshold", "noninferiority"] = "threshold"
    alpha: float = 0.05
    seed: int = 0
    n_resamples: int = 10_000
    # point: a category fails on its point drop (and says whether that drop is significant);
    # significant: only a drop that is significant after Holm adjustment fails it.
    category_rule: Literal["point", "significant"] = "point"
    # Compare only these suites (both runs must have them); None: all, which must match.
    suites: tuple[str, ...] | None = None
    # Id of a second evaluation of the base with another batch composition: its churn is the
    # noise floor the forgotten count is read against.
    noise_floor: str | None = None
    # Compare runs made on different engines (backend, dtype, engine version) anyway; the
    # difference is then a warning in the body instead of a 409.
    allow_backend_mismatch: bool = False


@dataclass(slots=True)
class Row(ItemRow):
    """An item row with the suite it belongs to and what was asked."""

    suite: str = ""
    kind: str = ""
    prompt: str = ""


def compare_forgetting(
    before: dict[str, Any], after: dict[str, Any], threshold: float = 0.10
) -> dict[str, Any]:
    """The lesson's ``compare_forgetting``, key for key and rounding for rounding."""
    drop = before["overall_accuracy"] - after["overall_accuracy"]
    forgot = drop > threshold
    category_drops = {}
    for cat in before["by_category"]:
        if cat in after["by_category"]:
            cat_drop = (
                before["by_category"][cat]["accuracy"] - after["by_category"][cat]["accuracy"]
            )
            category_drops[cat] = round(cat_drop, 3)
    return {
        "overall_accuracy_before": round(before["overall_accuracy"], 3),
        "overall_accuracy_after": round(after["overall_accuracy"], 3),
        "accuracy_drop": round(drop, 3),
        "catastrophic_forgetting_detected": forgot,
        "category_drops": category_drops,
        "recommendation": (
            "Reduce learning rate and epochs, or switch to LoRA"
            if forgot
            else "Fine-tuning preserved general capabilities"
        ),
    }


Pairs = Sequence[tuple[Row, Row]]


@dataclass(frozen=True)
class Contribution:
    """A kind's part of the ``/compare`` body and the reasons it gives the verdict to fail.

    ``findings``: every regression it found, ``{"rule", "subject", "message", "gates"}``; the
    ones that gate are the ``reasons``, the others are reported only (see ``of``).
    """

    body: dict[str, Any]
    reasons: list[str] = field(default_factory=list)
    findings: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def of(cls, body: dict[str, Any], findings: list[dict[str, Any]]) -> Contribution:
        """A contribution whose reasons are exactly its gating findings' messages."""
        return cls(body, [f["message"] for f in findings if f["gates"]], findings)


def finding(rule: str, subject: str, message: str, *, gates: bool) -> dict[str, Any]:
    """One regression: what rule, on what, in words, and whether it fails the verdict."""
    return {"rule": rule, "subject": subject, "message": message, "gates": gates}


def _flip(b: Row, a: Row) -> dict[str, Any]:
    return {
        "suite": b.suite,
        "item_id": b.item_id,
        "category": b.category,
        "question": (b.details or {}).get("question", b.prompt),
        "answers": (b.details or {}).get("answers"),
        "response_before": b.response,
        "response_after": a.response,
    }


def _summary(pairs: Sequence[tuple[Row, Row]], options: CompareOptions) -> dict[str, Any]:
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


def _statistics(pairs: list[tuple[Row, Row]], options: CompareOptions) -> dict[str, Any]:
    overall = _summary(pairs, options)
    by_category = {
        cat: _summary([(b, a) for b, a in pairs if (b.category or "general") == cat], options)
        for cat in dict.fromkeys(b.category or "general" for b, _ in pairs)
    }
    # One test per category is a family of tests: Holm keeps the chance of any false alarm
    # at alpha; the raw p stays beside the adjusted one.
    names = list(by_category)
    adjusted = stats.holm_adjust([by_category[c]["mcnemar_p_value"] for c in names])
    for cat, p_holm in zip(names, adjusted, strict=True):
        entry = by_category[cat]
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
        "by_category": by_category,
    }


def _test_name(row: Row) -> str:
    return str((row.details or {}).get("test", row.item_id))


def _checklist(pairs: list[tuple[Row, Row]]) -> dict[str, Any] | None:
    if not pairs:
        return None
    newly_failing = [
        {
            "suite": b.suite,
            "item_id": b.item_id,
            "test": _test_name(b),
            "severity": b.severity,
            "response_before": (b.response or "")[:200],
            "response_after": (a.response or "")[:200],
        }
        for b, a in pairs
        if b.passed and not a.passed
    ]
    newly_failing.sort(key=lambda f: SEVERITY_ORDER.get(f["severity"] or "low", 9))
    n = len(pairs)
    return {
        "score_before": sum(bool(b.passed) for b, _ in pairs) / n,
        "score_after": sum(bool(a.passed) for _, a in pairs) / n,
        "newly_failing": newly_failing,
        "newly_passing": [
            {"suite": b.suite, "item_id": b.item_id, "test": _test_name(b), "severity": b.severity}
            for b, a in pairs
            if a.passed and not b.passed
        ],
        # Every check with both outcomes, so a CI report can show one line per check.
        "items": [
            {
                "suite": b.suite,
                "item_id": b.item_id,
                "test": _test_name(b),
                "severity": b.severity,
                "passed_before": bool(b.passed),
                "passed_after": bool(a.passed),
            }
            for b, a in pairs
        ],
    }


def _nll(rows: Sequence[Row]) -> tuple[float, int]:
    nll = sum(float((r.details or {}).get("nll_sum", 0.0)) for r in rows)
    tokens = sum(int((r.details or {}).get("tokens", 0)) for r in rows)
    return nll, tokens


def _drift(pairs: list[tuple[Row, Row]]) -> dict[str, Any] | None:
    if not pairs:
        return None
    suites: dict[str, Any] = {}
    for name in dict.fromkeys(b.suite for b, _ in pairs):
        sub = [(b, a) for b, a in pairs if b.suite == name]
        # Each run is normalised by its own token count: the two models may tokenize differently.
        nll_b, tokens_b = _nll([b for b, _ in sub])
        nll_a, tokens_a = _nll([a for _, a in sub])
        before = nll_b / tokens_b if tokens_b else 0.0
        after = nll_a / tokens_a if tokens_a else 0.0
        ranked = sorted(sub, key=lambda p: (p[0].score or 0.0) - (p[1].score or 0.0))
        per_text = [
            {
                "item_id": b.item_id,
                "category": b.category,
                "nll_per_token_before": b.score,
                "nll_per_token_after": a.score,
                "change": (a.score or 0.0) - (b.score or 0.0),
            }
            for b, a in ranked[:LARGEST_NLL_INCREASES]
        ]
        suites[name] = {
            "nll_per_token_before": before,
            "nll_per_token_after": after,
            "change": after - before,
            "relative_change": (after - before) / before if before else 0.0,
            "texts": len(sub),
            "tokens_before": tokens_b,
            "tokens_after": tokens_a,
            "largest_increases": per_text,
            **suite_kl([(b.details, a.details) for b, a in sub]),
        }
    worst = max(suites.values(), key=lambda s: s["relative_change"])
    kls = [s["kl_per_token"] for s in suites.values() if s["kl_per_token"] is not None]
    notes = [f"{n}: {s['kl_note']}" for n, s in suites.items() if "kl_note" in s]
    return {
        "suites": suites,
        "relative_change": worst["relative_change"],
        # The worst suite's NLL rise and KL to base: both label-free drift signals.
        "nll": {
            "before": worst["nll_per_token_before"],
            "after": worst["nll_per_token_after"],
            "relative_change": worst["relative_change"],
        },
        "kl_per_token": max(kls) if kls else None,
        **({"kl_note": "; ".join(notes)} if notes else {}),
    }


def _multiple_choice(pairs: list[tuple[Row, Row]]) -> dict[str, Any] | None:
    if not pairs:
        return None
    n = len(pairs)
    return {
        "acc_before": sum(bool(b.passed) for b, _ in pairs) / n,
        "acc_after": sum(bool(a.passed) for _, a in pairs) / n,
        "forgotten": sum(1 for b, a in pairs if b.passed and not a.passed),
        "learned": sum(1 for b, a in pairs if a.passed and not b.passed),
    }


def _no_accuracy() -> dict[str, Any]:
    return {
        "overall_accuracy_before": None,
        "overall_accuracy_after": None,
        "accuracy_drop": None,
        "catastrophic_forgetting_detected": False,
        "category_drops": {},
        "recommendation": "No qa suite in both runs: nothing to compare on accuracy",
    }


def compare_qa(pairs: Pairs, options: CompareOptions) -> Contribution:
    """The lesson's accuracy keys, flips, statistics; fails on the drop and category rules."""
    pairs = list(pairs)
    lesson = (
        compare_forgetting(
            aggregate_qa([b for b, _ in pairs]),
            aggregate_qa([a for _, a in pairs]),
            options.threshold,
        )
        if pairs
        else _no_accuracy()
    )
    statistics = _statistics(pairs, options) if pairs else None
    body = {
        **lesson,
        "flips": {
            "forgotten": [_flip(b, a) for b, a in pairs if b.passed and not a.passed],
            "learned": [_flip(b, a) for b, a in pairs if a.passed and not b.passed],
        },
        "statistics": statistics,
    }
    found: list[dict[str, Any]] = []
    if lesson["catastrophic_forgetting_detected"]:
        found.append(
            finding(
                "accuracy",
                "overall",
                f"accuracy dropped {lesson['accuracy_drop']:.3f} "
                f"({lesson['overall_accuracy_before']:.3f} → "
                f"{lesson['overall_accuracy_after']:.3f}), more than the threshold "
                f"{options.threshold}",
                gates=True,
            )
        )
    if options.mode == "noninferiority" and statistics is not None:
        high = statistics["drop_ci95"][1]
        floor = statistics["noninferiority_floor"]
        if floor >= options.threshold:
            found.append(
                finding(
                    "accuracy",
                    "overall",
                    f"non-inferiority cannot be shown at n = {statistics['n_pairs']}: even with "
                    f"no item forgotten the {statistics['confidence']:.0%} upper bound of the "
                    f"drop is {floor:.3f}, not below the margin {options.threshold}",
                    gates=True,
                )
            )
        elif not stats.noninferiority_pass(high, options.threshold):
            found.append(
                finding(
                    "accuracy",
                    "overall",
                    f"non-inferiority not shown: the {statistics['confidence']:.0%} CI of the "
                    f"drop reaches {high:.3f}, not below the margin {options.threshold}",
                    gates=True,
                )
            )
    if statistics is not None:
        found += _category_findings(statistics, options)
    return Contribution.of(body, found)


def _category_findings(
    statistics: Mapping[str, Any], options: CompareOptions
) -> list[dict[str, Any]]:
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


def compare_checklist(pairs: Pairs, options: CompareOptions) -> Contribution:
    """Scores before/after, newly failing (most severe first); fails on a critical check."""
    checklist = _checklist(list(pairs))
    found = []
    for fail in (checklist or {}).get("newly_failing", []):
        critical = fail["severity"] == "critical"
        found.append(
            finding(
                "checklist",
                f"{fail['suite']}/{fail['test']}",
                f"{'critical' if critical else fail['severity']} check {fail['test']!r} "
                "passed before and fails after"
                + ("" if critical else " (reported; only critical checks fail the gate)"),
                gates=critical,
            )
        )
    return Contribution.of({"checklist": checklist}, found)


def compare_multiple_choice(pairs: Pairs, options: CompareOptions) -> Contribution:
    """acc before/after with forgotten/learned counts; the key is absent when none ran."""
    multiple_choice = _multiple_choice(list(pairs))
    return Contribution({} if multiple_choice is None else {"multiple_choice": multiple_choice})


def compare_perplexity(pairs: Pairs, options: CompareOptions) -> Contribution:
    """NLL-per-token drift and KL to base per suite; fails past ``max_nll_increase``/``max_kl``."""
    drift = _drift(list(pairs))
    found = []
    if options.max_nll_increase is not None and drift is not None:
        for name, suite in drift["suites"].items():
            if suite["relative_change"] > options.max_nll_increase:
                found.append(
                    finding(
                        "drift",
                        name,
                        f"NLL/token on {name!r} rose {suite['relative_change']:.1%} "
                        f"({suite['nll_per_token_before']:.3f} → "
                        f"{suite['nll_per_token_after']:.3f}), more than "
                        f"{options.max_nll_increase:.0%}",
                        gates=True,
                    )
                )
    if options.max_kl is not None and drift is not None:
        for name, suite in drift["suites"].items():
            if suite["kl_per_token"] is None:
                found.append(
                    finding(
                        "drift",
                        name,
                        f"max_kl is set but KL to base on {name!r} is unavailable "
                        f"({suite['kl_note']}); reported, does not fail the gate",
                        gates=False,
                    )
                )
            elif suite["kl_per_token"] > options.max_kl:
                found.append(
                    finding(
                        "drift",
                        name,
                        f"KL(base ‖ candidate) on {name!r} is {suite['kl_per_token']:.4f} "
                        f"nats/token, more than max_kl {options.max_kl}",
                        gates=True,
                    )
                )
    return Contribution.of({"drift": drift}, found)
