"""Evaluate suites on a live model without a database: for callbacks inside a training loop.

The same runners, scoring and aggregates as a stored evaluation, so a number here means what
it means in ``GET /evaluations/{id}``; only persistence and resumption are left out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from app.suites.kinds import KINDS, ItemRow, validate_suite
from workers.engine.transformers_backend import TransformersBackend
from workers.evaluation.runners import RunSettings, run_items


def evaluate_suites(
    model: Any,
    tokenizer: Any,
    suites: Sequence[Mapping[str, Any]],
    *,
    prompt_format: str | None = None,
    max_new_tokens: int = 50,
    stop: Sequence[str] = (),
) -> dict[str, dict[str, Any]]:
    """Results per suite name, exactly as an evaluation job would aggregate them."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    fmt = prompt_format or ("chat" if has_template else "plain")
    if fmt == "chat" and not has_template:
        raise ValueError("prompt_format 'chat' needs a chat template; this tokenizer has none")
    backend = TransformersBackend(model, tokenizer)
    settings = RunSettings(prompt_format=fmt, max_new_tokens=max_new_tokens, stop=tuple(stop))
    results: dict[str, dict[str, Any]] = {}
    for raw in suites:
        definition = validate_suite(dict(raw)).model_dump(mode="json")
        rows: list[dict[str, Any]] = []
        items = list(enumerate(definition["items"]))
        run_items(definition["kind"], backend, definition, items, settings, rows.extend)
        rows.sort(key=lambda r: r["position"])
        results[definition["name"]] = KINDS[definition["kind"]].aggregate(
            [ItemRow.of(r) for r in rows]
        )
    return results
