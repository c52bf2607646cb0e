"""Before/after comparison and the verdict. Pure functions: rows in, a dict out.

``build`` returns the ``/compare`` body: each registered suite kind's contribution (its
``compare`` in ``app/suites/kinds/``: the lesson's ``compare_forgetting`` keys unchanged,
``flips`` and ``statistics`` for qa, ``checklist``, ``multiple_choice``, ``drift`` for
perplexity), then the ``verdict`` with the ``reasons`` the kinds gave.
``comparability_problems`` says why two runs must not be compared at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from app.suites.accuracy import POWER
from app.suites.kinds import KINDS
from app.suites.kinds.qa import LESSON_FORGOT, LESSON_PRESERVED
from app.suites.registry import Row, finding
from app.suites.rules import CompareOptions

CHURN_SHOWN = 20

__all__ = ["CompareOptions", "build", "comparability_problems", "verdict_words"]


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


# What to do about a failing rule; the lesson's advice for accuracy (its compare_forgetting).
ADVICE = {
    "accuracy": LESSON_FORGOT,
    "category": LESSON_FORGOT,
    "checklist": "A critical behaviour was lost ({subject}): reduce learning rate and epochs, "
    "replay general instruction data, or switch to LoRA",
    "drift": "The model drifted from the base on general text ({subject}): reduce learning "
    "rate and epochs, add replay, or switch to LoRA",
}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def verdict_words(body: Mapping[str, Any]) -> dict[str, str]:
    """The verdict in words: ``headline`` and ``recommendation``, derived from the findings.

    The headline is the verdict and its main reason (the first finding that gates, in the
    order the kinds report them: accuracy, categories, checklist behaviours, drift), e.g.
    ``FAIL: critical behaviour 'Basic instruction following' fell from 8/8 to 2/8 (p = 0.031):
    …``; a pass names the accuracy it kept and how many findings were reported only. The
    recommendation is the lesson's for accuracy and a pass, and names the behaviour or the
    drift when that is why the verdict fails. Every surface (``/compare``, the dashboard's
    compare and fine-tune pages, the gate) shows these words, so they cannot disagree. Bodies
    stored before findings existed are read from their ``reasons``.
    """
    findings = body.get("findings")
    if findings is None:
        findings = [
            finding("accuracy", "overall", r, gates=True) for r in body.get("reasons") or []
        ]
    gating = [f for f in findings if f["gates"]]
    reported = len(findings) - len(gating)
    if gating:
        main = gating[0]
        more = f" (and {_plural(len(gating) - 1, 'more reason')})" if len(gating) > 1 else ""
        advice = ADVICE.get(main["rule"], LESSON_FORGOT)
        return {
            "headline": f"FAIL: {main['message']}{more}",
            "recommendation": advice.format(subject=main["subject"]),
        }
    parts = ["PASS: no forgetting rule failed"]
    before, after = body.get("overall_accuracy_before"), body.get("overall_accuracy_after")
    if before is not None and after is not None:
        parts.append(f"accuracy {before:.3f} → {after:.3f} (threshold {body.get('threshold')})")
    if reported:
        parts.append(f"{_plural(reported, 'finding')} reported, not gated")
    if body.get("same_run"):
        parts.append("same run compared with itself")  # a pass that proves nothing: say so
    return {"headline": "; ".join(parts), "recommendation": LESSON_PRESERVED}


def build(
    before_run: dict[str, Any],
    after_run: dict[str, Any],
    before_rows: Sequence[Row],
    after_rows: Sequence[Row],
    options: CompareOptions,
    noise_rows: tuple[str, Sequence[Row]] | None = None,
) -> dict[str, Any]:
    """The full ``/compare`` body: every kind's contribution, then the verdict and its reasons.

    Runs are ``{"id", "source"?}`` (``source``: whose items they are, for cached copies).
    ``noise_rows``: ``(id, rows)`` of a second run of the base, for the noise floor. Every
    regression is a finding; ``reasons`` are those that gate, the rest are reported.
    """

    body: dict[str, Any] = {"before": before_run["id"], "after": after_run["id"]}
    found: list[dict[str, Any]] = []
    for name, kind in KINDS.items():
        pairs = _paired(
            [r for r in before_rows if r.kind == name], [r for r in after_rows if r.kind == name]
        )
        contribution = kind.compare(pairs, options)
        body.update(contribution.body)
        found.extend(contribution.findings)
        # A kind that gives reasons without findings: each reason gates, under the kind's name.
        covered = {f["message"] for f in contribution.findings}
        found.extend(
            finding(name, name, reason, gates=True)
            for reason in contribution.reasons
            if reason not in covered
        )

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
    reasons = [f["message"] for f in found if f["gates"]]
    body["verdict"] = "fail" if reasons else "pass"
    body["reasons"] = reasons
    body["findings"] = found
    body.update(verdict_words(body))
    # The guard's reading (max_drop) beside the verdict, never changing it.
    body["guard"] = options.guard(body)
    statistics = body.get("statistics")
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
