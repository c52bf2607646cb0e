"""Question answering, the lesson's general-knowledge QA loop: greedy answer, substring match.

An item is right when any accepted answer is a case-insensitive substring of the model's
stripped greedy continuation. The result is the lesson's ``evaluate_general_qa``; the
comparison is its ``compare_forgetting`` keys, plus the flips and the paired statistics, and
fails on the accuracy drop and the category rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, field_validator

from app.core.formatting import percent
from app.stats import statistics as stats
from app.suites.accuracy import (
    accuracy_detail,
    by_category,
    category_findings,
    paired_statistics,
)
from app.suites.registry import (
    Contribution,
    Display,
    Item,
    ItemRow,
    Pairs,
    Row,
    Suite,
    SuiteKind,
    finding,
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


class QAItem(Strict):
    id: ItemId
    question: Text
    answers: list[Choice] = Field(min_length=1)
    category: Short = "general"


class QASuite(SuiteBase):
    kind: Literal["qa"]
    prompt_template: PromptTemplate = DEFAULT_PROMPT_TEMPLATE
    items: list[QAItem] = Field(min_length=1, max_length=MAX_ITEMS)

    _check_template = field_validator("prompt_template")(template_has_question)


def score_qa(item: Item, results: Sequence[str], suite: Suite) -> dict[str, Any]:
    """Greedy answers; correct when any accepted answer is a case-insensitive substring."""
    answer = results[0].lower()
    correct = any(a.lower() in answer for a in item["answers"])
    return {
        "passed": correct,
        "score": float(correct),
        "category": item.get("category"),
        "severity": None,
        "details": {"question": item["question"], "answers": item["answers"]},
    }


def aggregate_qa(rows: Sequence[ItemRow]) -> dict[str, Any]:
    """The lesson's ``evaluate_general_qa`` result: correct, total, accuracy, by_category."""
    correct = sum(int(bool(r.passed)) for r in rows)
    total = len(rows)
    return {
        "kind": "qa",
        "overall_accuracy": correct / total if total else 0.0,
        "correct": correct,
        "total": total,
        "by_category": by_category(rows),
    }


# The lesson's two recommendations, word for word.
LESSON_FORGOT = "Reduce learning rate and epochs, or switch to LoRA"
LESSON_PRESERVED = "Fine-tuning preserved general capabilities"


def compare_forgetting(
    before: dict[str, Any],
    after: dict[str, Any],
    threshold: float = CompareOptions.model_fields["threshold"].default,
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
        "recommendation": LESSON_FORGOT if forgot else LESSON_PRESERVED,
    }


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
    statistics = paired_statistics(pairs, options) if pairs else None
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
        found += category_findings(statistics, options)
    return Contribution.of(body, found)


QA = register_kind(
    SuiteKind(
        "qa",
        QASuite,
        request="generate",
        score=score_qa,
        aggregate=aggregate_qa,
        compare=compare_qa,
        display=Display(
            title="Question answering accuracy",
            headline=lambda r: percent(r.get("overall_accuracy"), 1),
            detail=accuracy_detail,
            short=lambda r: percent(r.get("overall_accuracy")),
            category_chart=True,
        ),
    )
)
