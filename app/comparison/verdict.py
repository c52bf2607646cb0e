"""Before/after comparison and the verdict. Pure functions: rows in, a dict out.

``build`` returns the ``/compare`` body: the lesson's ``compare_forgetting`` keys unchanged,
then ``checklist``, ``flips``, ``statistics`` (exact McNemar, paired-bootstrap CI, per
category), ``drift`` (NLL per token on perplexity suites) and the ``verdict`` with its
``reasons``. ``comparability_problems`` says why two runs must not be compared at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from app.comparison import statistics as stats
from app.suites.kinds import ItemRow, aggregate_qa

SEVERITY_ORDER = {"critical": 0, "high": 1, "medium": 2, "low": 3}
LARGEST_NLL_INCREASES = 5
POWER = 0.8  # the power at which min_detectable_drop is stated
CHURN_SHOWN = 20


@dataclass(frozen=True)
class CompareOptions:
    """The verdict's rules; defaults are the lesson's (drop > 0.10 is forgetting)."""

    threshold: float = 0.10
    max_category_drop: float | None = None
    max_nll_increase: float | None = None
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


# Engine settings that decide how items are batched, not what is asked: they must not change a
# greedy answer, so runs that differ only in them are comparable (the noise floor needs this).
ENGINE_ONLY_SETTINGS = ("batch_size",)


def _generation_differences(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    return [
        f"{key} {before.get(key)!r} before, {after.get(key)!r} after"
        for key in sorted(set(before) | set(after))
        if key not in ENGINE_ONLY_SETTINGS and before.get(key) != after.get(key)
    ]


def comparability_problems(
    before: dict[str, Any], after: dict[str, Any], suites: Sequence[str] | None = None
) -> list[str]:
    """What differs between two runs that would make their scores incomparable (empty: none).

    Runs are ``{"suites": [snapshot…], "prompt_format", "generation"}``; suites are matched by
    name and compared by content hash, so an edited suite is named with both versions.
    ``suites`` restricts the comparison to those names, which both runs must have.
    """
    problems = []
    b_suites = {s["name"]: s for s in before["suites"]}
    a_suites = {s["name"]: s for s in after["suites"]}
    names = sorted(set(b_suites) | set(a_suites)) if suites is None else list(suites)
    mismatched = False
    for name in names:
        if name not in a_suites or name not in b_suites:
            if suites is not None:
                missing = [
                    w for w, s in (("before", b_suites), ("after", a_suites)) if name not in s
                ]
                problems.append(
                    f"suite {name!r} is not in the {' or the '.join(missing)} evaluation"
                )
                continue
            mismatched = True
            which = "before" if name in b_suites else "after"
            problems.append(f"suite {name!r} ran only in the {which} evaluation")
        elif b_suites[name]["content_hash"] != a_suites[name]["content_hash"]:
            problems.append(
                f"suite {name!r} differs: version {b_suites[name]['version']} before, "
                f"version {a_suites[name]['version']} after (content hashes differ)"
            )
    if mismatched:
        shared = [n for n in b_suites if n in a_suites]
        problems.append(
            f"pass suites={','.join(shared)} to compare the suites both runs share"
            if shared
            else "the runs share no suite"
        )
    if before["prompt_format"] != after["prompt_format"]:
        problems.append(
            f"prompt_format differs: {before['prompt_format']!r} before, "
            f"{after['prompt_format']!r} after"
        )
    diffs = _generation_differences(before["generation"], after["generation"])
    if diffs:
        problems.append("generation settings differ: " + "; ".join(diffs))
    return problems


def _paired(before: Sequence[Row], after: Sequence[Row]) -> list[tuple[Row, Row]]:
    # Comparable runs share suite contents, so their rows usually line up one to one already.
    if len(before) == len(after) and all(
        b.item_id == a.item_id and b.suite == a.suite for b, a in zip(before, after, strict=True)
    ):
        return list(zip(before, after, strict=True))
    after_by_key = {(r.suite, r.item_id): r for r in after}
    return [
        (b, after_by_key[(b.suite, b.item_id)])
        for b in before
        if (b.suite, b.item_id) in after_by_key
    ]


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
        }
    worst = max(suites.values(), key=lambda s: s["relative_change"])
    return {"suites": suites, "relative_change": worst["relative_change"]}


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


def _finding(rule: str, subject: str, message: str, *, gates: bool) -> dict[str, Any]:
    return {"rule": rule, "subject": subject, "message": message, "gates": gates}


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
        found.append(_finding("category", str(cat), message, gates=gates))
    return found


def findings(
    lesson: Mapping[str, Any],
    statistics: Mapping[str, Any] | None,
    checklist: Mapping[str, Any] | None,
    drift: Mapping[str, Any] | None,
    options: CompareOptions,
) -> list[dict[str, Any]]:
    """Every regression the comparison found, each ``{"rule", "subject", "message", "gates"}``.

    ``gates`` says whether it fails the verdict; the others are reported only. Reports (JUnit,
    Markdown, the dashboard) mark as failed exactly the findings that gate, so they can never
    disagree with the exit code.
    """
    found: list[dict[str, Any]] = []
    if lesson["catastrophic_forgetting_detected"]:
        found.append(
            _finding(
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
                _finding(
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
                _finding(
                    "accuracy",
                    "overall",
                    f"non-inferiority not shown: the {statistics['confidence']:.0%} CI of the "
                    f"drop reaches {high:.3f}, not below the margin {options.threshold}",
                    gates=True,
                )
            )
    if statistics is not None:
        found += _category_findings(statistics, options)
    if checklist is not None:
        for fail in checklist["newly_failing"]:
            critical = fail["severity"] == "critical"
            found.append(
                _finding(
                    "checklist",
                    f"{fail['suite']}/{fail['test']}",
                    f"{'critical' if critical else fail['severity']} check {fail['test']!r} "
                    "passed before and fails after"
                    + ("" if critical else " (reported; only critical checks fail the gate)"),
                    gates=critical,
                )
            )
    if options.max_nll_increase is not None and drift is not None:
        for name, suite in drift["suites"].items():
            if suite["relative_change"] > options.max_nll_increase:
                found.append(
                    _finding(
                        "drift",
                        name,
                        f"NLL/token on {name!r} rose {suite['relative_change']:.1%} "
                        f"({suite['nll_per_token_before']:.3f} → "
                        f"{suite['nll_per_token_after']:.3f}), more than "
                        f"{options.max_nll_increase:.0%}",
                        gates=True,
                    )
                )
    return found


def verdict_reasons(
    lesson: Mapping[str, Any],
    statistics: Mapping[str, Any] | None,
    checklist: Mapping[str, Any] | None,
    drift: Mapping[str, Any] | None,
    options: CompareOptions,
) -> list[str]:
    """Why the comparison fails (empty: it passes). The lesson's rule first, then the rest."""
    return [
        f["message"] for f in findings(lesson, statistics, checklist, drift, options) if f["gates"]
    ]


def power_warnings(
    statistics: Mapping[str, Any] | None, options: CompareOptions
) -> list[dict[str, Any]]:
    """``underpowered`` warnings: where the sample cannot tell the gated drop from noise."""
    if statistics is None:
        return []
    warnings = []
    n = statistics["n_pairs"]
    mdd = statistics["min_detectable_drop"]
    how = f"at α = {options.alpha} with {POWER:.0%} power"
    if mdd is None or mdd > options.threshold:
        detail = (
            f"even losing all {n} items is not significant {how}"
            if mdd is None
            else f"the minimum detectable drop {how} is {mdd:.3f}"
        )
        warnings.append(
            {
                "code": "underpowered",
                "scope": "overall",
                "n": n,
                "min_detectable_drop": mdd,
                "message": f"underpowered: n = {n} cannot distinguish a {options.threshold:.2f} "
                f"drop from noise ({detail}); add items to the suite",
            }
        )
    if options.mode == "noninferiority" and statistics["noninferiority_floor"] >= options.threshold:
        warnings.append(
            {
                "code": "underpowered",
                "scope": "noninferiority",
                "n": n,
                "min_detectable_drop": mdd,
                "message": f"underpowered: mode=noninferiority cannot pass at n = {n}: the "
                f"smallest possible upper bound of the drop is "
                f"{statistics['noninferiority_floor']:.3f}, not below {options.threshold}",
            }
        )
    if options.max_category_drop is not None:
        for cat, c in statistics["by_category"].items():
            cat_mdd = c["min_detectable_drop"]
            if cat_mdd is None or cat_mdd > options.max_category_drop:
                shown = "any drop" if cat_mdd is None else f"drops below {cat_mdd:.3f}"
                warnings.append(
                    {
                        "code": "underpowered",
                        "scope": f"category:{cat}",
                        "n": c["n_pairs"],
                        "min_detectable_drop": cat_mdd,
                        "message": f"underpowered: category {cat!r} (n = {c['n_pairs']}) cannot "
                        f"distinguish {shown} from noise {how}",
                    }
                )
    return warnings


def noise_floor(
    base_rows: Sequence[Row], rerun_rows: Sequence[Row], rerun_id: str, forgotten: int | None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Churn between two runs of the base (items that flip with no change) and its warning."""
    pairs = [(b, a) for b, a in _paired(base_rows, rerun_rows) if b.kind != "perplexity"]
    flipped = [(b, a) for b, a in pairs if bool(b.passed) != bool(a.passed)]
    qa_churn = sum(1 for b, _ in flipped if b.kind == "qa")
    floor = {
        "evaluation": rerun_id,
        "items": len(pairs),
        "churn": len(flipped),
        "qa_churn": qa_churn,
        "churn_rate": len(flipped) / len(pairs) if pairs else 0.0,
        "flipped": [
            {"suite": b.suite, "item_id": b.item_id, "passed_first": bool(b.passed)}
            for b, _ in flipped[:CHURN_SHOWN]
        ],
    }
    warnings = []
    if forgotten is not None and forgotten > 0 and forgotten <= qa_churn:
        warnings.append(
            {
                "code": "within_noise_floor",
                "scope": "overall",
                "message": f"within the noise floor: {forgotten} forgotten items, but "
                f"{qa_churn} items flip between two runs of the unchanged base",
            }
        )
    return floor, warnings


def build(
    before_run: dict[str, Any],
    after_run: dict[str, Any],
    before_rows: Sequence[Row],
    after_rows: Sequence[Row],
    options: CompareOptions,
    noise_rows: tuple[str, Sequence[Row]] | None = None,
) -> dict[str, Any]:
    """The full ``/compare`` body: the lesson's keys, checklist, flips, statistics, drift, verdict.

    Runs are ``{"id", "source"?}`` (``source``: whose items they are, for cached copies).
    ``noise_rows``: ``(id, rows)`` of a second run of the base, for the noise floor.
    """

    def pairs(kind: str) -> list[tuple[Row, Row]]:
        return _paired(
            [r for r in before_rows if r.kind == kind], [r for r in after_rows if r.kind == kind]
        )

    qa_pairs = pairs("qa")
    lesson = (
        compare_forgetting(
            aggregate_qa([b for b, _ in qa_pairs]),
            aggregate_qa([a for _, a in qa_pairs]),
            options.threshold,
        )
        if qa_pairs
        else _no_accuracy()
    )
    body: dict[str, Any] = {"before": before_run["id"], "after": after_run["id"], **lesson}

    same_run = before_run["id"] == after_run["id"]
    same_source = before_run.get("source", before_run["id"]) == after_run.get(
        "source", after_run["id"]
    )
    if same_run:
        body["note"] = "before and after are the same evaluation: this compares a run with itself"
    elif same_source:
        body["note"] = (
            "before and after share one set of results (one is a cached copy of the "
            "other): this compares a run with itself"
        )
    body["same_run"] = same_run or same_source
    body["threshold"] = options.threshold
    body["mode"] = options.mode

    checklist = _checklist(pairs("checklist"))
    statistics = _statistics(qa_pairs, options) if qa_pairs else None
    drift = _drift(pairs("perplexity"))
    body["checklist"] = checklist
    body["flips"] = {
        "forgotten": [_flip(b, a) for b, a in qa_pairs if b.passed and not a.passed],
        "learned": [_flip(b, a) for b, a in qa_pairs if a.passed and not b.passed],
    }
    body["statistics"] = statistics
    if (multiple_choice := _multiple_choice(pairs("multiple_choice"))) is not None:
        body["multiple_choice"] = multiple_choice
    body["drift"] = drift

    found = findings(lesson, statistics, checklist, drift, options)
    reasons = [f["message"] for f in found if f["gates"]]
    body["verdict"] = "fail" if reasons else "pass"
    body["reasons"] = reasons
    body["findings"] = found
    warnings = power_warnings(statistics, options)
    if noise_rows is not None:
        body["noise_floor"], noise_warnings = noise_floor(
            before_rows,
            noise_rows[1],
            noise_rows[0],
            statistics["forgotten"] if statistics else None,
        )
        warnings += noise_warnings
    body["warnings"] = warnings
    return body
