"""Suite kinds: the schema of each kind's items and how item rows aggregate into results.

``KINDS`` is the registry: a kind is a pydantic suite model plus a pure ``aggregate`` function
over its item rows (the worker side keeps the matching runner in ``workers.runners``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.suites.checks import validate_check

DEFAULT_PROMPT_TEMPLATE = "Question: {question}\nAnswer:"
MAX_TEXT = 8 * 1024
MAX_ITEMS = 10_000

Name = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,99}$")]
ItemId = Annotated[
    str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
]
Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]
Short = Annotated[str, Field(min_length=1, max_length=100)]
Severity = Literal["critical", "high", "medium", "low"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class QAItem(_Strict):
    id: ItemId
    question: Text
    answers: list[Annotated[str, Field(min_length=1, max_length=1000)]] = Field(min_length=1)
    category: Short = "general"


class ChecklistItem(_Strict):
    id: ItemId
    test: Short
    prompt: Text
    severity: Severity = "medium"
    check: dict[str, Any]
    category: Short = "general"

    @field_validator("check")
    @classmethod
    def _valid_check(cls, check: dict[str, Any]) -> dict[str, Any]:
        problems = validate_check(check)
        if problems:
            raise ValueError("; ".join(problems))
        return check


class MultipleChoiceItem(_Strict):
    id: ItemId
    question: Text
    choices: list[Annotated[str, Field(min_length=1, max_length=1000)]] = Field(min_length=2)
    gold: int = Field(ge=0)
    category: Short = "general"

    @model_validator(mode="after")
    def _gold_in_range(self) -> MultipleChoiceItem:
        if self.gold >= len(self.choices):
            raise ValueError(f"gold {self.gold} is out of range for {len(self.choices)} choices")
        return self


class PerplexityItem(_Strict):
    id: ItemId
    text: Text
    category: Short = "general"


class _SuiteBase(_Strict):
    name: Name
    description: Annotated[str, Field(max_length=MAX_TEXT)] | None = None

    @model_validator(mode="after")
    def _unique_ids(self) -> Any:
        seen: dict[str, int] = {}
        for index, item in enumerate(self.items):  # type: ignore[attr-defined]
            if item.id in seen:
                raise ValueError(
                    f"duplicate item id {item.id!r} at items[{index}] "
                    f"(first at items[{seen[item.id]}])"
                )
            seen[item.id] = index
        return self


def _template_has_question(template: str) -> str:
    if "{question}" not in template:
        raise ValueError("prompt_template must contain the placeholder {question}")
    return template


class QASuite(_SuiteBase):
    kind: Literal["qa"]
    prompt_template: Annotated[str, Field(max_length=2000)] = DEFAULT_PROMPT_TEMPLATE
    items: list[QAItem] = Field(min_length=1, max_length=MAX_ITEMS)

    _check_template = field_validator("prompt_template")(_template_has_question)


class ChecklistSuite(_SuiteBase):
    kind: Literal["checklist"]
    items: list[ChecklistItem] = Field(min_length=1, max_length=MAX_ITEMS)


class MultipleChoiceSuite(_SuiteBase):
    kind: Literal["multiple_choice"]
    prompt_template: Annotated[str, Field(max_length=2000)] = DEFAULT_PROMPT_TEMPLATE
    items: list[MultipleChoiceItem] = Field(min_length=1, max_length=MAX_ITEMS)

    _check_template = field_validator("prompt_template")(_template_has_question)


class PerplexitySuite(_SuiteBase):
    kind: Literal["perplexity"]
    items: list[PerplexityItem] = Field(min_length=1, max_length=MAX_ITEMS)


SuiteDefinition = Annotated[
    QASuite | ChecklistSuite | MultipleChoiceSuite | PerplexitySuite, Field(discriminator="kind")
]


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


@dataclass(frozen=True)
class SuiteKind:
    name: str
    model: type[_SuiteBase]
    aggregate: Callable[[Sequence[ItemRow]], dict[str, Any]]
    generates: bool  # True: greedy generation (max_new_tokens matters); False: log-likelihood


KINDS: dict[str, SuiteKind] = {
    "qa": SuiteKind("qa", QASuite, aggregate_qa, generates=True),
    "checklist": SuiteKind("checklist", ChecklistSuite, aggregate_checklist, generates=True),
    "multiple_choice": SuiteKind(
        "multiple_choice", MultipleChoiceSuite, aggregate_multiple_choice, generates=False
    ),
    "perplexity": SuiteKind("perplexity", PerplexitySuite, aggregate_perplexity, generates=False),
}


def render_prompt(template: str, question: str) -> str:
    """Fill ``{question}``; plain replacement, so a template can never reach Python's format()."""
    return template.replace("{question}", question)
