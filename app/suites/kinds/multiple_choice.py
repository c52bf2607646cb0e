"""Multiple choice, lm-eval style: the choice the model finds most likely after the question.

Each choice is one ``loglikelihood`` request after the question; ``acc`` takes the argmax of
``log p(choice | prompt)``, ``acc_norm`` the argmax per byte of choice. The comparison gives
acc before and after with the items forgotten and learned; it never fails the verdict.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from app.core.formatting import percent
from app.suites.accuracy import accuracy_detail, by_category
from app.suites.registry import (
    Contribution,
    Display,
    Item,
    ItemRow,
    Pairs,
    Request,
    Row,
    Suite,
    SuiteKind,
    question_text,
    register_kind,
)
from app.suites.rules import CompareOptions
from app.suites.schema import (
    DEFAULT_PROMPT_TEMPLATE,
    MAX_ITEMS,
    Choice,
    ItemId,
    PromptTemplate,
    Short,
    Strict,
    SuiteBase,
    Text,
    template_has_question,
)


class MultipleChoiceItem(Strict):
    id: ItemId
    question: Text
    choices: list[Choice] = Field(min_length=2)
    gold: int = Field(ge=0)
    category: Short = "general"

    @model_validator(mode="after")
    def _gold_in_range(self) -> MultipleChoiceItem:
        if self.gold >= len(self.choices):
            raise ValueError(f"gold {self.gold} is out of range for {len(self.choices)} choices")
        return self


class MultipleChoiceSuite(SuiteBase):
    kind: Literal["multiple_choice"]
    prompt_template: PromptTemplate = DEFAULT_PROMPT_TEMPLATE
    items: list[MultipleChoiceItem] = Field(min_length=1, max_length=MAX_ITEMS)

    _check_template = field_validator("prompt_template")(template_has_question)


def ask_choices(item: Item, suite: Suite, fmt: str) -> list[Request]:
    """One request per choice, after the question as ``question_text`` puts it."""
    text = question_text(item, suite, fmt)
    # lm-eval's target delimiter: a space after "Answer:"; none after a chat turn start.
    delimiter = "" if fmt == "chat" else " "
    return [Request(text, continuation=f"{delimiter}{choice}") for choice in item["choices"]]


def score_multiple_choice(
    item: Item, results: Sequence[tuple[float, bool]], suite: Suite
) -> dict[str, Any]:
    """lm-eval: argmax of log p(choice | prompt) (acc) and per byte of choice (acc_norm)."""
    choices = item["choices"]
    n = len(choices)
    logliks = [r[0] for r in results]
    pred = max(range(n), key=lambda i: logliks[i])
    normed = [ll / max(1, len(c.encode())) for ll, c in zip(logliks, choices, strict=True)]
    pred_norm = max(range(n), key=lambda i: normed[i])
    return {
        "response": choices[pred],
        "passed": pred == item["gold"],
        "score": logliks[item["gold"]],
        "category": item.get("category"),
        "severity": None,
        "details": {
            "question": item["question"],
            "choices": choices,
            "gold": item["gold"],
            "logliks": logliks,
            "pred": pred,
            "pred_norm": pred_norm,
            "correct_norm": pred_norm == item["gold"],
        },
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
        "by_category": by_category(rows),
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


def compare_multiple_choice(pairs: Pairs, options: CompareOptions) -> Contribution:
    """acc before/after with forgotten/learned counts; the key is absent when none ran."""
    multiple_choice = _multiple_choice(list(pairs))
    return Contribution({} if multiple_choice is None else {"multiple_choice": multiple_choice})


MULTIPLE_CHOICE = register_kind(
    SuiteKind(
        "multiple_choice",
        MultipleChoiceSuite,
        request="loglikelihood",
        requests=ask_choices,
        score=score_multiple_choice,
        aggregate=aggregate_multiple_choice,
        compare=compare_multiple_choice,
        display=Display(
            title="Multiple-choice accuracy",
            headline=lambda r: percent(r.get("overall_accuracy"), 1),
            detail=lambda r: f"{accuracy_detail(r)} · acc_norm {percent(r.get('acc_norm'), 1)}",
            short=lambda r: percent(r.get("overall_accuracy")),
            category_chart=True,
        ),
    )
)
