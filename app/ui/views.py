"""Pure view models for the dashboard: API bodies and rows in, what a page shows out.

Nothing here touches the database or HTTP, so the page logic (what is sorted first, which
numbers are headlines, which charts are drawn) is tested without a server.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from markupsafe import Markup

from app.suites.schema import SEVERITY_ORDER
from app.ui.charts import (
    AFTER_COLOR,
    BEFORE_COLOR,
    LineSeries,
    Note,
    Series,
    grouped_bar_chart,
    line_chart,
)


def qa_by_category(
    results: dict[str, Any] | None, kinds: Sequence[str] = ("qa",)
) -> dict[str, dict[str, int]]:
    """Correct/total per category, summed over the ``qa`` suites of one evaluation's results."""
    merged: dict[str, dict[str, int]] = {}
    for suite in (results or {}).values():
        if not isinstance(suite, dict) or suite.get("kind") not in kinds:
            continue
        for cat, entry in (suite.get("by_category") or {}).items():
            slot = merged.setdefault(cat, {"correct": 0, "total": 0})
            slot["correct"] += int(entry.get("correct", 0))
            slot["total"] += int(entry.get("total", 0))
    return merged


def _accuracy(entry: dict[str, int] | None) -> float | None:
    if not entry or not entry.get("total"):
        return None
    return entry["correct"] / entry["total"]


def category_rows(
    body: dict[str, Any],
    before_results: dict[str, Any] | None,
    after_results: dict[str, Any] | None,
) -> list[dict[str, Any]]:
    """One row per category, worst drop first: accuracy before/after, drop, flips, p-value."""
    before, after = qa_by_category(before_results), qa_by_category(after_results)
    drops: dict[str, float] = body.get("category_drops") or {}
    by_cat: dict[str, Any] = (body.get("statistics") or {}).get("by_category") or {}
    threshold = float(body["threshold"])  # every comparison body states the rule it used
    names = list(dict.fromkeys([*drops, *before, *after]))
    rows = []
    for name in names:
        b, a = _accuracy(before.get(name)), _accuracy(after.get(name))
        drop = drops.get(name)
        if drop is None and b is not None and a is not None:
            drop = round(b - a, 3)
        stats = by_cat.get(name) or {}
        rows.append(
            {
                "category": name,
                "before": b,
                "after": a,
                "drop": drop,
                "n": (before.get(name) or after.get(name) or {}).get("total", 0),
                "forgotten": stats.get("forgotten"),
                "learned": stats.get("learned"),
                "p_value": stats.get("mcnemar_p_value"),
                "p_value_holm": stats.get("p_value_holm"),
                "fell": drop is not None and drop > threshold,
            }
        )
    rows.sort(key=_worst_first)
    return rows


def _worst_first(row: dict[str, Any]) -> tuple[float, str]:
    drop = row["drop"]
    return (-drop if drop is not None else math.inf, str(row["category"]))


def change_note(drop: float | None, threshold: float) -> Note | None:
    """Words and a tone for one category's change: ``▼ 65 pts`` (bad past the threshold)."""
    if drop is None:
        return None
    points = round(drop * 100)
    if points > 0:
        return Note(f"▼ {points} pts", "bad" if drop > threshold else "neutral")
    if points < 0:
        return Note(f"▲ {-points} pts", "good")
    return Note("no change", "neutral")


def compare_category_chart(rows: Sequence[dict[str, Any]], threshold: float) -> Markup:
    """Grouped before/after accuracy bars per category, worst drop on top."""
    return grouped_bar_chart(
        [r["category"] for r in rows],
        [
            Series("before", [r["before"] for r in rows], BEFORE_COLOR),
            Series("after", [r["after"] for r in rows], AFTER_COLOR),
        ],
        title="Accuracy by category, before and after fine-tuning",
        value_format="{:.0%}",
        notes=[change_note(r["drop"], threshold) for r in rows],
        bar_height=18,
    )


def accuracy_chart(by_category: dict[str, Any], title: str) -> Markup:
    """Accuracy bars per category of one evaluation, lowest first."""
    cats = sorted(by_category, key=lambda c: (by_category[c].get("accuracy", 0.0), c))
    return grouped_bar_chart(
        cats,
        [Series("accuracy", [by_category[c].get("accuracy") for c in cats], AFTER_COLOR)],
        title=title,
        value_format="{:.0%}",
    )


def drift_rows(drift: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per perplexity suite: NLL/token before and after, the change, the worst texts."""
    rows = []
    for name, suite in ((drift or {}).get("suites") or {}).items():
        rows.append({"suite": name, **suite})
    return rows


def drift_chart(rows: Sequence[dict[str, Any]]) -> Markup | None:
    """Before/after NLL-per-token bars per perplexity suite, labelled with the relative change."""
    if not rows:
        return None
    top = max(max(r["nll_per_token_before"], r["nll_per_token_after"]) for r in rows)
    notes = []
    for r in rows:
        rel = r["relative_change"]
        if rel > 0.005:
            notes.append(Note(f"▲ {rel:+.0%}", "bad" if rel > 0.10 else "neutral"))
        elif rel < -0.005:
            notes.append(Note(f"▼ {rel:+.0%}", "good"))
        else:
            notes.append(Note("no change", "neutral"))
    return grouped_bar_chart(
        [r["suite"] for r in rows],
        [
            Series("before", [r["nll_per_token_before"] for r in rows], BEFORE_COLOR),
            Series("after", [r["nll_per_token_after"] for r in rows], AFTER_COLOR),
        ],
        title="Negative log-likelihood per token on general text (higher = more drift)",
        max_value=_round_up(top * 1.05),
        value_format="{:.2f}",
        notes=notes,
    )


def _round_up(value: float) -> float:
    if value <= 0:
        return 1.0
    magnitude = 10 ** math.floor(math.log10(value))
    for m in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if m * magnitude >= value:
            return m * magnitude
    return value


def sort_flips(
    flips: Iterable[dict[str, Any]], category_order: Sequence[str]
) -> list[dict[str, Any]]:
    """Flipped items grouped by category, worst category first, then by item id."""
    rank = {c: i for i, c in enumerate(category_order)}
    return sorted(
        flips,
        key=lambda f: (rank.get(f.get("category") or "general", len(rank)), str(f.get("item_id"))),
    )


def sort_by_severity(rows: Iterable[Any], key: str = "severity") -> list[Any]:
    """Critical first, then high, medium, low, then anything without a severity."""

    def severity(row: Any) -> str:
        value = row.get(key) if isinstance(row, dict) else getattr(row, key, None)
        return value or "low"

    return sorted(rows, key=lambda r: SEVERITY_ORDER.get(severity(r), 9))


def training_curves(events: Iterable[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """``loss`` and ``learning_rate`` over ``step`` from fine-tune event data (others ignored)."""
    curves: dict[str, list[tuple[float, float]]] = {
        "loss": [],
        "eval_loss": [],
        "learning_rate": [],
    }
    for data in events:
        if not isinstance(data, dict):
            continue
        step = _finite(data.get("step"))
        if step is None:
            continue
        for name in curves:
            value = _finite(data.get(name))
            if value is not None:
                curves[name].append((step, value))
    return curves


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def loss_chart(curves: dict[str, list[tuple[float, float]]]) -> Markup:
    """Training (and evaluation, when logged) loss over steps."""
    series = [LineSeries("training loss", curves.get("loss", []), AFTER_COLOR)]
    if curves.get("eval_loss"):
        series.append(LineSeries("eval loss", curves["eval_loss"], "#c2410c"))
    return line_chart(series, title="Loss over training steps", x_label="step", y_label="loss")


def lr_chart(curves: dict[str, list[tuple[float, float]]]) -> Markup:
    """The learning-rate schedule over steps (warmup, decay)."""
    return line_chart(
        [LineSeries("learning rate", curves.get("learning_rate", []), "#047857")],
        title="Learning rate over training steps",
        x_label="step",
        y_label="learning rate",
        y_from_zero=True,
    )


def checkpoint_curves(
    checkpoints: Sequence[Any],
) -> tuple[list[LineSeries], list[LineSeries]]:
    """(forgetting, learning) series from checkpoint evaluations: general accuracy and checklist
    score per step; held-out domain NLL per token and domain accuracy per step."""
    forgetting: dict[str, list[tuple[float, float]]] = {"general accuracy": [], "checklist": []}
    learning: dict[str, list[tuple[float, float]]] = {
        "held-out NLL/token": [],
        "domain accuracy": [],
    }
    for c in checkpoints:
        general, domain = c.general or {}, (c.domain or {}).get("after") or {}
        for name, value in (
            ("general accuracy", general.get("accuracy")),
            ("checklist", general.get("checklist_score")),
        ):
            if (v := _finite(value)) is not None:
                forgetting[name].append((float(c.step), v))
        for name, value in (
            ("held-out NLL/token", domain.get("nll_per_token")),
            ("domain accuracy", domain.get("accuracy")),
        ):
            if (v := _finite(value)) is not None:
                learning[name].append((float(c.step), v))
    colors = {
        "general accuracy": AFTER_COLOR,
        "checklist": "#7c3aed",
        "held-out NLL/token": "#c2410c",
        "domain accuracy": "#047857",
    }
    return (
        [LineSeries(k, v, colors[k]) for k, v in forgetting.items() if v],
        [LineSeries(k, v, colors[k]) for k, v in learning.items() if v],
    )


def forgetting_chart(series: list[LineSeries]) -> Markup:
    """General accuracy (and checklist score) at each evaluated step: the forgetting curve."""
    return line_chart(
        series,
        title="General abilities over training steps",
        x_label="step",
        y_label="score",
        y_from_zero=True,
    )


def learning_chart(series: list[LineSeries]) -> Markup:
    """Held-out domain NLL per token (and domain accuracy) at each step: the learning curve."""
    return line_chart(
        series, title="Domain learning over training steps", x_label="step", y_label="value"
    )


def warning_text(warning: Any) -> str:
    """A fine-tune warning as one line, whether stored as a string or a ``{"message"}`` dict."""
    if isinstance(warning, dict):
        return str(warning.get("message") or warning.get("detail") or warning)
    return str(warning)
