"""Before/after comparison and the verdict. Pure functions: rows in, a dict out.

``build`` returns the ``/compare`` body: each registered suite kind's contribution
(``app.comparison.contributions``: the lesson's ``compare_forgetting`` keys unchanged, ``flips``
and ``statistics`` for qa, ``checklist``, ``multiple_choice``, ``drift`` for perplexity), then
the ``verdict`` with the ``reasons`` the kinds gave. ``comparability_problems`` says why two
runs must not be compared at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from app.comparison.contributions import (
    LARGEST_NLL_INCREASES,
    SEVERITY_ORDER,
    CompareOptions,
    Row,
    compare_forgetting,
)
from app.suites.kinds import KINDS

__all__ = [
    "LARGEST_NLL_INCREASES",
    "SEVERITY_ORDER",
    "CompareOptions",
    "Row",
    "build",
    "comparability_problems",
    "compare_forgetting",
]


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


def build(
    before_run: dict[str, Any],
    after_run: dict[str, Any],
    before_rows: Sequence[Row],
    after_rows: Sequence[Row],
    options: CompareOptions,
) -> dict[str, Any]:
    """The full ``/compare`` body: every kind's contribution, then the verdict and its reasons.

    Runs are ``{"id", "source"?}`` (``source``: whose items they are, for cached copies).
    """

    body: dict[str, Any] = {"before": before_run["id"], "after": after_run["id"]}
    reasons: list[str] = []
    for name, kind in KINDS.items():
        pairs = _paired(
            [r for r in before_rows if r.kind == name], [r for r in after_rows if r.kind == name]
        )
        contribution = kind.compare(pairs, options)
        body.update(contribution.body)
        reasons.extend(contribution.reasons)

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
    body["verdict"] = "fail" if reasons else "pass"
    body["reasons"] = reasons
    return body
