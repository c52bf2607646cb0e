"""Evaluate suites on a live model without a database: for callbacks inside a training loop.

The same drivers, scoring, aggregates and comparison as a stored evaluation, so a number here
means what it means in ``GET /evaluations/{id}`` and a verdict what it means in ``GET /compare``;
only persistence and resumption are left out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from app.comparison.verdict import build
from app.suites.kinds import KINDS, validate_suite
from app.suites.registry import Row
from app.suites.rules import CompareOptions, CompareRules
from workers.engine.transformers_backend import TransformersBackend
from workers.evaluation.scoring import RunSettings, run_items


def run_suites(
    model: Any,
    tokenizer: Any,
    suites: Sequence[Mapping[str, Any]],
    *,
    prompt_format: str | None = None,
    max_new_tokens: int = 50,
    stop: Sequence[str] = (),
) -> list[Row]:
    """Every item of ``suites`` on the live model, as comparison rows (in suite order)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    fmt = prompt_format or ("chat" if has_template else "plain")
    if fmt == "chat" and not has_template:
        raise ValueError("prompt_format 'chat' needs a chat template; this tokenizer has none")
    backend = TransformersBackend(model, tokenizer)
    settings = RunSettings(prompt_format=fmt, max_new_tokens=max_new_tokens, stop=tuple(stop))
    out: list[Row] = []
    for raw in suites:
        definition = validate_suite(dict(raw)).model_dump(mode="json")
        rows: list[dict[str, Any]] = []
        items = list(enumerate(definition["items"]))
        run_items(definition["kind"], backend, definition, items, settings, rows.extend)
        out.extend(
            Row.written(r, definition["name"], definition["kind"])
            for r in sorted(rows, key=lambda r: r["position"])
        )
    return out


def results(rows: Sequence[Row]) -> dict[str, dict[str, Any]]:
    """Results per suite name, exactly as an evaluation job would aggregate them."""
    suites: dict[str, list[Row]] = {}
    for row in rows:
        suites.setdefault(row.suite, []).append(row)
    return {name: KINDS[rows[0].kind].aggregate(rows) for name, rows in suites.items()}


def compare_rows(
    before: Sequence[Row], after: Sequence[Row], rules: CompareRules, *, after_id: str = "after"
) -> dict[str, Any]:
    """The ``/compare`` body of two in-process runs under ``rules``: verdict, reasons, guard."""
    return build({"id": "before"}, {"id": after_id}, before, after, CompareOptions.of(rules))
