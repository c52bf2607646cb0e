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


def _generation_differences(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    return [
        f"{key} {before.get(key)!r} before, {after.get(key)!r} after"
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key)
    ]


def comparability_problems(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What differs between two runs that would make their scores incomparable (empty: none).

    Runs are ``{"suites": [snapshot…], "prompt_format", "generation"}``; suites are matched by
    name and compared by content hash, so an edited suite is named with both versions.
    """
    problems = []
    b_suites = {s["name"]: s for s in before["suites"]}
    a_suites = {s["name"]: s for s in after["suites"]}
    for name in sorted(set(b_suites) | set(a_suites)):
        if name not in a_suites or name not in b_suites:
            which = "before" if name in b_suites else "after"
            problems.append(f"suite {name!r} ran only in the {which} evaluation")
        elif b_suites[name]["content_hash"] != a_suites[name]["content_hash"]:
            problems.append(
                f"suite {name!r} differs: version {b_suites[name]['version']} before, "
                f"version {a_suites[name]['version']} after (content hashes differ)"
            )
    if before["prompt_format"] != after["prompt_format"]:
        problems.append(
            f"prompt_format differs: {before['prompt_format']!r} before, "
            f"{after['prompt_format']!r} after"
        )
    if before["generation"] != after["generation"]:
        diffs = _generation_differences(before["generation"], after["generation"])
        problems.append("generation settings differ: " + "; ".join(diffs))
    return problems


ENGINE_FIELDS = (("backend", "backend"), ("dtype", "dtype"), ("version", "engine version"))


def engine_differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """How the engines of two runs differ (empty: the same), e.g. ``backend differs: …``.

    Runs carry ``engine``: ``{"backend", "dtype", "version"}`` as the worker recorded it, or
    only ``backend`` for runs recorded before engines were (their dtype and version are
    unknown, and unknown is not taken for a difference).
    """
    b_engine = before.get("engine") or {}
    a_engine = after.get("engine") or {}
    problems = []
    for key, label in ENGINE_FIELDS:
        b_value, a_value = b_engine.get(key), a_engine.get(key)
        if b_value is None or a_value is None or b_value == a_value:
            continue
        problems.append(f"{label} differs: {b_value!r} before, {a_value!r} after")
    return problems


ADAPTER_NO_EFFECT = (
    "the adapter changed nothing — was it applied? every answer and log-probability of the "
    "candidate equals the base model's"
)


def adapter_changed_nothing(
    before: Sequence[tuple[str, str, str | None, float | None]],
    after: Sequence[tuple[str, str, str | None, float | None]],
) -> bool:
    """Whether every item's answer and score (log-likelihood / NLL) is the same in both runs.

    Rows are ``(suite, item_id, response, score)``. A LoRA adapter that trained at all moves
    some logit, so identical outputs on every item mean it was most likely not applied (a
    data-parallel serving bug once dropped adapters silently, lm-eval issue 2432).
    """
    if not before or len(before) != len(after):
        return False
    after_by_key = {(s, i): (r, sc) for s, i, r, sc in after}
    for suite, item_id, response, score in before:
        other = after_by_key.get((suite, item_id))
        if other is None or other[0] != response:
            return False
        if (score is None) != (other[1] is None):
            return False
        if score is not None and other[1] is not None and score != other[1]:
            return False
    return True


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


def _statistics(pairs: list[tuple[Row, Row]], options: CompareOptions) -> dict[str, Any]:
    overall = _summary(pairs, options)
    by_category = {
        cat: _summary([(b, a) for b, a in pairs if (b.category or "general") == cat], options)
        for cat in dict.fromkeys(b.category or "general" for b, _ in pairs)
    }
    return {**overall, "confidence": 1.0 - options.alpha, "by_category": by_category}


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


def verdict_reasons(
    lesson: Mapping[str, Any],
    statistics: Mapping[str, Any] | None,
    checklist: Mapping[str, Any] | None,
    drift: Mapping[str, Any] | None,
    options: CompareOptions,
) -> list[str]:
    """Why the comparison fails (empty: it passes). The lesson's rule first, then the rest."""
    reasons: list[str] = []
    if lesson["catastrophic_forgetting_detected"]:
        reasons.append(
            f"accuracy dropped {lesson['accuracy_drop']:.3f} "
            f"({lesson['overall_accuracy_before']:.3f} → {lesson['overall_accuracy_after']:.3f}), "
            f"more than the threshold {options.threshold}"
        )
    if options.mode == "noninferiority" and statistics is not None:
        high = statistics["drop_ci95"][1]
        if not stats.noninferiority_pass(high, options.threshold):
            reasons.append(
                f"non-inferiority not shown: the {statistics['confidence']:.0%} CI of the drop "
                f"reaches {high:.3f}, not below the margin {options.threshold}"
            )
    if options.max_category_drop is not None and statistics is not None:
        # Unrounded drops: the rounded category_drops are for display.
        for cat, cat_stats in statistics["by_category"].items():
            if cat_stats["drop"] > options.max_category_drop:
                reasons.append(
                    f"category {cat!r} dropped {cat_stats['drop']:.3f} "
                    f"({cat_stats['accuracy_before']:.3f} → {cat_stats['accuracy_after']:.3f}), "
                    f"more than max_category_drop {options.max_category_drop}"
                )
    if checklist is not None:
        for fail in checklist["newly_failing"]:
            if fail["severity"] == "critical":
                reasons.append(f"critical check {fail['test']!r} passed before and fails after")
    if options.max_nll_increase is not None and drift is not None:
        for name, suite in drift["suites"].items():
            if suite["relative_change"] > options.max_nll_increase:
                reasons.append(
                    f"NLL/token on {name!r} rose {suite['relative_change']:.1%} "
                    f"({suite['nll_per_token_before']:.3f} → {suite['nll_per_token_after']:.3f}), "
                    f"more than {options.max_nll_increase:.0%}"
                )
    return reasons


def build(
    before_run: dict[str, Any],
    after_run: dict[str, Any],
    before_rows: Sequence[Row],
    after_rows: Sequence[Row],
    options: CompareOptions,
) -> dict[str, Any]:
    """The full ``/compare`` body: the lesson's keys, checklist, flips, statistics, drift, verdict.

    Runs are ``{"id", "source"?}`` (``source``: whose items they are, for cached copies).
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

    reasons = verdict_reasons(lesson, statistics, checklist, drift, options)
    body["verdict"] = "fail" if reasons else "pass"
    body["reasons"] = reasons
    return body
