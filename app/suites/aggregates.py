"""How a suite kind's stored item rows aggregate into its result (pure functions).

Each suite kind's registry entry (``app.suites.kinds.KINDS``) names one of these.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class ItemRow:
    """What aggregation needs from a stored item row."""

    item_id: str
    passed: bool | None
    score: float | None
    category: str | None
    severity: str | None
    response: str | None
    details: dict[str, Any] | None

    @classmethod
    def of(cls, row: Any) -> ItemRow:
        """From a stored row (attributes) or a row being written (a mapping)."""
        get = row.__getitem__ if isinstance(row, Mapping) else row.__getattribute__
        return cls(*(get(name) for name in cls.__slots__))


def _by_category(rows: Sequence[ItemRow]) -> dict[str, dict[str, Any]]:
    by_cat: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = by_cat.setdefault(row.category or "general", {"correct": 0, "total": 0})
        entry["correct"] += int(bool(row.passed))
        entry["total"] += 1
    for entry in by_cat.values():
        entry["accuracy"] = entry["correct"] / entry["total"]
    return by_cat


def aggregate_qa(rows: Sequence[ItemRow]) -> dict[str, Any]:
    """The lesson's ``evaluate_general_qa`` result: correct, total, accuracy, by_category."""
    correct = sum(int(bool(r.passed)) for r in rows)
    total = len(rows)
    return {
        "kind": "qa",
        "overall_accuracy": correct / total if total else 0.0,
        "correct": correct,
        "total": total,
        "by_category": _by_category(rows),
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


def aggregate_multiple_choice(rows: Sequence[ItemRow]) -> dict[str, Any]:
    """lm-eval's ``acc`` (argmax log-likelihood) and ``acc_norm`` (per-character normalised)."""
    total = len(rows)
    correct = sum(int(bool(r.passed)) for r in rows)
    correct_norm = sum(int(bool((r.details or {}).get("correct_norm"))) for r in rows)
    return {
        "kind": "multiple_choice",
        "acc": correct / total if total else 0.0,
        "acc_norm": correct_norm / total if total else 0.0,
        "overall_accuracy": correct / total if total else 0.0,
        "correct": correct,
        "total": total,
        "by_category": _by_category(rows),
    }


def aggregate_perplexity(rows: Sequence[ItemRow]) -> dict[str, Any]:
    """Mean negative log-likelihood per token over all texts (token-weighted) and perplexity."""
    nll = sum(float((r.details or {}).get("nll_sum", 0.0)) for r in rows)
    tokens = sum(int((r.details or {}).get("tokens", 0)) for r in rows)
    per_token = nll / tokens if tokens else 0.0
    by_cat: dict[str, dict[str, float]] = {}
    for r in rows:
        entry = by_cat.setdefault(r.category or "general", {"nll_sum": 0.0, "tokens": 0})
        entry["nll_sum"] += float((r.details or {}).get("nll_sum", 0.0))
        entry["tokens"] += int((r.details or {}).get("tokens", 0))
    return {
        "kind": "perplexity",
        "nll_per_token": per_token,
        "perplexity": math.exp(per_token) if tokens else None,
        "tokens": tokens,
        "total": len(rows),
        "by_category": {
            cat: {
                "nll_per_token": e["nll_sum"] / e["tokens"] if e["tokens"] else 0.0,
                "tokens": int(e["tokens"]),
            }
            for cat, e in by_cat.items()
        },
    }
