"""The behavioural checklist, the lesson's forgetting checklist: a declarative check per prompt.

Each item's prompt is answered greedily and its ``check`` (``app.suites.checks``) judges the
stripped response. The result is the lesson's ``run_forgetting_checklist``; the comparison
lists the checks that newly fail, most severe first, measures each behaviour (the items sharing
a ``behaviour``, or one item) as a pass rate, and fails on a critical behaviour whose rate fell
significantly or by more than ``max_behaviour_drop`` (docs/verdict.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from app.core.formatting import percent
from app.stats import statistics as stats
from app.suites.checks import failed_rule, validate_check
from app.suites.registry import (
    Contribution,
    Display,
    Item,
    ItemRow,
    Pairs,
    Result,
    Row,
    Suite,
    SuiteKind,
    finding,
    register_kind,
)
from app.suites.rules import CompareOptions
from app.suites.schema import (
    MAX_ITEMS,
    SEVERITY_ORDER,
    ItemId,
    Severity,
    Short,
    Strict,
    SuiteBase,
    Text,
)


class ChecklistItem(Strict):
    id: ItemId
    test: Short
    prompt: Text
    severity: Severity = "medium"
    check: dict[str, Any]
    category: Short = "general"
    # Items naming one behaviour measure it together, as a rate (paraphrases of one check);
    # without it an item is a behaviour of its own. Left out of the stored definition when
    # absent, so suites written before it keep their content hash.
    behaviour: Short | None = Field(default=None, exclude_if=lambda v: v is None)

    @field_validator("check")
    @classmethod
    def _valid_check(cls, check: dict[str, Any]) -> dict[str, Any]:
        problems = validate_check(check)
        if problems:
            raise ValueError("; ".join(problems))
        return check


class ChecklistSuite(SuiteBase):
    kind: Literal["checklist"]
    items: list[ChecklistItem] = Field(min_length=1, max_length=MAX_ITEMS)

    @model_validator(mode="after")
    def _one_severity_per_behaviour(self) -> ChecklistSuite:
        first: dict[str, tuple[int, str]] = {}
        for index, item in enumerate(self.items):
            if item.behaviour is None:
                continue
            seen = first.setdefault(item.behaviour, (index, item.severity))
            if seen[1] != item.severity:
                raise ValueError(
                    f"items[{index}] has severity {item.severity!r} but behaviour "
                    f"{item.behaviour!r} is {seen[1]!r} at items[{seen[0]}]: the items of one "
                    "behaviour share one severity"
                )
        return self


def score_checklist(item: Item, results: Sequence[str], suite: Suite) -> dict[str, Any]:
    """Greedy responses checked by the declarative check of each item."""
    rule = failed_rule(item["check"], results[0])
    passed = rule is None
    details: dict[str, Any] = {"test": item["test"]}
    if item.get("behaviour"):
        details["behaviour"] = item["behaviour"]
    if rule is not None:
        details["failed_rule"] = rule  # which rule to read the response against
    return {
        "passed": passed,
        "score": float(passed),
        "category": item.get("category"),
        "severity": item.get("severity"),
        "details": details,
    }


def aggregate_checklist(rows: Sequence[ItemRow]) -> dict[str, Any]:
    """The lesson's ``run_forgetting_checklist`` result: passed, failed, score, failures."""
    failures = [
        {
            "test": (r.details or {}).get("test", r.item_id),
            "severity": r.severity,
            "response": (r.response or "")[:200],
        }
        for r in rows
        if not r.passed
    ]
    passed = len(rows) - len(failures)
    return {
        "kind": "checklist",
        "passed": passed,
        "failed": len(failures),
        "score": passed / len(rows) if rows else 0.0,
        "failures": failures,
    }


def _test_name(row: Row) -> str:
    return str((row.details or {}).get("test", row.item_id))


def _behaviour_name(row: Row) -> str | None:
    name = (row.details or {}).get("behaviour")
    return str(name) if name else None


def behaviours(pairs: Pairs) -> list[dict[str, Any]]:
    """Each behaviour's pass rate before and after, most severe first.

    A behaviour is the items of one suite that share a ``behaviour`` name (reworded prompts
    measuring one thing); an item without one is a behaviour of its own, named by its test.
    ``p_value`` is the exact McNemar test on the behaviour's paired items.
    """
    groups: dict[tuple[str, str], list[tuple[Row, Row]]] = {}
    for b, a in pairs:
        name = _behaviour_name(b)
        key = (b.suite, f"behaviour:{name}" if name else f"item:{b.item_id}")
        groups.setdefault(key, []).append((b, a))
    out: list[dict[str, Any]] = []
    for (suite, _), members in groups.items():
        first = members[0][0]
        n = len(members)
        before = sum(bool(b.passed) for b, _ in members)
        after = sum(bool(a.passed) for _, a in members)
        forgotten = sum(bool(b.passed) and not a.passed for b, a in members)
        learned = sum(bool(a.passed) and not b.passed for b, a in members)
        out.append(
            {
                "suite": suite,
                "behaviour": _behaviour_name(first) or _test_name(first),
                "severity": first.severity,
                "n_items": n,
                "item_ids": [b.item_id for b, _ in members],
                "passed_before": before,
                "passed_after": after,
                "rate_before": before / n,
                "rate_after": after / n,
                "drop": (before - after) / n,
                "forgotten": forgotten,
                "learned": learned,
                "p_value": stats.mcnemar_exact(forgotten, learned),
            }
        )
    out.sort(key=lambda g: SEVERITY_ORDER.get(g["severity"] or "low", 9))
    return out


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
        "behaviours": behaviours(pairs),
    }


def behaviour_finding(group: dict[str, Any], options: CompareOptions) -> dict[str, Any] | None:
    """The finding of a behaviour whose pass rate fell (None when it did not).

    A critical behaviour gates when its drop is significant (exact McNemar at ``alpha``) or
    larger than ``max_behaviour_drop``; a behaviour of one item gates when that item fails
    (the lesson's rule), and the message says it rests on one item.
    """
    if group["forgotten"] <= group["learned"]:
        return None
    critical = group["severity"] == "critical"
    severity = group["severity"] or "low"
    subject = f"{group['suite']}/{group['behaviour']}"
    if group["n_items"] == 1:
        message = f"{severity} check {group['behaviour']!r} passed before and fails after"
        if critical:
            return finding("checklist", subject, f"{message} (1 item; low evidence)", gates=True)
        return finding(
            "checklist",
            subject,
            f"{message} (reported; only critical checks fail the gate)",
            gates=False,
        )
    n, p = group["n_items"], group["p_value"]
    fell = (
        f"{severity} behaviour {group['behaviour']!r} fell from {group['passed_before']}/{n} "
        f"to {group['passed_after']}/{n} (p = {p:.2g})"
    )
    if not critical:
        return finding(
            "checklist",
            subject,
            f"{fell} (reported; only critical checks fail the gate)",
            gates=False,
        )
    significant = p < options.alpha
    large = group["drop"] > options.max_behaviour_drop
    if not (significant or large):
        return finding(
            "checklist",
            subject,
            f"{fell}: reported, not significant at α = {options.alpha} and not more than "
            f"max_behaviour_drop {options.max_behaviour_drop}",
            gates=False,
        )
    why = []
    if significant:
        why.append(f"significant at α = {options.alpha}")
    if large:
        why.append(
            f"a drop of {group['drop']:.2f}, more than max_behaviour_drop "
            f"{options.max_behaviour_drop}"
        )
    if not significant and group["forgotten"] - group["learned"] == 1:
        why.append("one item decides; low evidence")
    return finding("checklist", subject, f"{fell}: {'; '.join(why)}", gates=True)


def compare_checklist(pairs: Pairs, options: CompareOptions) -> Contribution:
    """Scores, newly failing checks, behaviour rates; fails on a critical behaviour's drop."""
    checklist = _checklist(list(pairs))
    found = [
        f
        for group in (checklist or {}).get("behaviours", [])
        if (f := behaviour_finding(group, options)) is not None
    ]
    return Contribution.of({"checklist": checklist}, found)


def _short(result: Result) -> str:
    passed = result.get("passed", 0)
    return f"{passed}/{passed + result.get('failed', 0)}"


CHECKLIST = register_kind(
    SuiteKind(
        "checklist",
        ChecklistSuite,
        request="generate",
        score=score_checklist,
        aggregate=aggregate_checklist,
        compare=compare_checklist,
        compare_needs_text=True,
        display=Display(
            title="Behavioural checklist",
            headline=_short,
            detail=lambda r: f"checks passed ({percent(r.get('score'))})",
            short=_short,
            severity_table=True,
        ),
    )
)
