"""A new suite kind is one registration, and nothing else.

The throwaway ``word_count`` kind below (what a file in ``app/suites/kinds/`` would hold) is
accepted by ``POST /suites``, evaluated by the real worker on tiny models, compared by
``/compare`` and shown by the dashboard, without a line of the service, the worker or the
templates knowing its name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from app.suites.kinds import KINDS
from app.suites.registry import (
    REQUEST_TYPES,
    Card,
    Contribution,
    Display,
    ItemRow,
    Pairs,
    SuiteKind,
    register_kind,
    unregister_kind,
)
from app.suites.rules import CompareOptions
from app.suites.schema import MAX_ITEMS, ItemId, SuiteBase, Text
from workers.main import Worker

# --- the whole of the new kind: its schema, scorer, aggregate, comparison and display -------


class WordCountItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: ItemId
    prompt: Text
    max_words: Annotated[int, Field(ge=1)]
    category: str = "general"


class WordCountSuite(SuiteBase):
    kind: Literal["word_count"]
    items: list[WordCountItem] = Field(min_length=1, max_length=MAX_ITEMS)


def aggregate_word_count(rows: Sequence[ItemRow]) -> dict[str, Any]:
    """Mean words per answer and the share of answers within their item's limit."""
    total = len(rows)
    return {
        "kind": "word_count",
        "mean_words": sum(r.score or 0.0 for r in rows) / total if total else 0.0,
        "within_limit": sum(bool(r.passed) for r in rows) / total if total else 0.0,
        "total": total,
    }


def compare_word_count(pairs: Pairs, options: CompareOptions) -> Contribution:
    """Mean words before and after; fails when fewer answers keep within their limit."""
    if not pairs:
        return Contribution({})
    before = aggregate_word_count([b for b, _ in pairs])
    after = aggregate_word_count([a for _, a in pairs])
    body = {
        "word_count": {
            "mean_words_before": before["mean_words"],
            "mean_words_after": after["mean_words"],
            "within_limit_before": before["within_limit"],
            "within_limit_after": after["within_limit"],
        }
    }
    reasons = []
    if after["within_limit"] < before["within_limit"]:
        reasons.append(
            f"answers within their word limit fell from {before['within_limit']:.0%} "
            f"to {after['within_limit']:.0%}"
        )
    return Contribution(body, reasons)


def word_count_cards(body: dict[str, Any]) -> list[Card]:
    """One compare-page card: mean words per answer before → after."""
    section = body.get("word_count")
    if not section:
        return []
    return [
        Card(
            "Mean words per answer",
            f"{section['mean_words_before']:.1f} → {section['mean_words_after']:.1f}",
            f"{section['within_limit_after']:.0%} within the limit after",
            bad=section["within_limit_after"] < section["within_limit_before"],
        )
    ]


def score_word_count(item: Any, results: Sequence[str], suite: Any) -> dict[str, Any]:
    """The number of words answered, and whether it is within the item's limit."""
    words = len(results[0].split())
    return {
        "passed": words <= item["max_words"],
        "score": float(words),
        "category": item.get("category"),
        "severity": None,
        "details": {"words": words, "max_words": item["max_words"]},
    }


WORD_COUNT = SuiteKind(
    "word_count",
    WordCountSuite,
    request="generate",
    score=score_word_count,
    aggregate=aggregate_word_count,
    compare=compare_word_count,
    display=Display(
        title="Answer length",
        headline=lambda r: f"{r['mean_words']:.1f} words",
        detail=lambda r: f"{r['within_limit']:.0%} of answers within their limit",
        short=lambda r: f"{r['mean_words']:.1f} words",
        compare_cards=word_count_cards,
    ),
)


# --- the test -----------------------------------------------------------------------------

SUITE = {
    "name": "answer-length",
    "kind": "word_count",
    "items": [
        {"id": "w1", "prompt": "Say hello.", "max_words": 3, "category": "greeting"},
        {"id": "w2", "prompt": "Describe the sea.", "max_words": 50},
        {"id": "w3", "prompt": "Name a colour.", "max_words": 1},
    ],
}


@pytest.fixture
def word_count_kind() -> Iterator[SuiteKind]:
    """The throwaway kind, registered for one test and removed after it."""
    register_kind(WORD_COUNT)
    try:
        yield WORD_COUNT
    finally:
        unregister_kind("word_count")


@pytest.fixture(scope="module")
def other_tiny_model_dir(tiny_model_dir: Path) -> Path:
    """A second tiny model (another seed) beside the first: the "after" of a comparison."""
    from tests.tiny_model import build_tiny_model

    return build_tiny_model(tiny_model_dir.parent / "tiny-seed1", seed=1)


def _evaluate(client: Any, model: Path) -> dict[str, Any]:
    created = client.post(
        "/evaluations",
        json={
            "model": {"path": str(model)},
            "suites": ["answer-length"],
            "prompt_format": "plain",
            "generation": {"max_new_tokens": 12},
            "cache": False,
        },
    )
    assert created.status_code == 202, created.text
    worker = Worker(client.app.state.settings, device="cpu", once=True, worker_id="inproc")
    assert worker.run() == 0
    evaluation: dict[str, Any] = client.get(f"/evaluations/{created.json()['id']}").json()
    assert evaluation["status"] == "succeeded", evaluation["error"]
    return evaluation


def test_a_new_kind_is_uploaded_evaluated_compared_and_shown(  # type: ignore[no-untyped-def]
    client, tiny_model_dir, other_tiny_model_dir, word_count_kind
) -> None:
    uploaded = client.post("/suites", json=SUITE)
    assert uploaded.status_code == 201, uploaded.text
    assert uploaded.json()["kind"] == "word_count" and uploaded.json()["item_count"] == 3
    # The new kind's own schema validates its items, with the usual problem+json location.
    bad = client.post("/suites", json={**SUITE, "items": [{**SUITE["items"][0], "max_words": 0}]})
    assert bad.status_code == 422 and bad.json()["errors"][0]["loc"] == [
        "body",
        "items",
        0,
        "max_words",
    ]

    before = _evaluate(client, tiny_model_dir)
    after = _evaluate(client, other_tiny_model_dir)
    items = client.get(f"/evaluations/{before['id']}/items?suite=answer-length").json()["data"]
    assert len(items) == 3
    for item in items:  # scored by score_word_count on what the model generated
        assert item["score"] == len(item["response"].split()) == item["details"]["words"]
        assert item["passed"] == (item["details"]["words"] <= item["details"]["max_words"])
    result = before["results"]["answer-length"]
    assert result["kind"] == "word_count" and result["total"] == 3
    assert result["mean_words"] == pytest.approx(sum(i["score"] for i in items) / 3)

    compared = client.get(f"/compare?before={before['id']}&after={after['id']}")
    assert compared.status_code == 200, compared.text
    body = compared.json()
    section = body["word_count"]
    assert section["mean_words_before"] == pytest.approx(result["mean_words"])
    assert section["mean_words_after"] == pytest.approx(
        after["results"]["answer-length"]["mean_words"]
    )
    fell = section["within_limit_after"] < section["within_limit_before"]
    assert body["verdict"] == ("fail" if fell else "pass")
    assert any("word limit" in r for r in body["reasons"]) == fell
    # No qa suite ran: the lesson's keys say so instead of failing.
    assert body["overall_accuracy_before"] is None and body["checklist"] is None

    page = client.get(f"/ui/evaluations/{before['id']}").text
    assert f"{result['mean_words']:.1f} words" in page and 'title="Answer length"' in page
    assert "(word_count)" in page
    listing = client.get("/ui/evaluations").text
    assert f"answer-length</span> {result['mean_words']:.1f} words" in listing
    compare_page = client.get(f"/ui/compare?before={before['id']}&after={after['id']}")
    assert compare_page.status_code == 200
    assert "Mean words per answer" in compare_page.text
    assert f"{section['mean_words_before']:.1f} → {section['mean_words_after']:.1f}" in (
        compare_page.text
    )


def test_a_kind_is_gone_once_unregistered(client, word_count_kind) -> None:  # type: ignore[no-untyped-def]
    unregister_kind("word_count")
    assert "word_count" not in KINDS
    refused = client.post("/suites", json=SUITE)
    assert refused.status_code == 422
    assert "does not match any of the expected tags" in refused.json()["detail"]


def test_registering_a_kind_twice_or_with_a_mismatched_schema_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_kind(KINDS["qa"])
    with pytest.raises(ValueError, match="must be Literal"):
        register_kind(dataclasses.replace(WORD_COUNT, name="wc2"))
    with pytest.raises(ValueError, match="request"):
        register_kind(dataclasses.replace(WORD_COUNT, request="embed"))  # type: ignore[arg-type]
    assert "wc2" not in KINDS and "word_count" not in KINDS


def test_every_kind_has_a_driver_for_its_request() -> None:
    from workers.engine import base
    from workers.engine.base import Backend
    from workers.evaluation.scoring import DRIVERS

    # One list of request types, which the engine reads: exactly the Backend's methods.
    assert base.REQUEST_TYPES is REQUEST_TYPES
    assert set(DRIVERS) == set(REQUEST_TYPES) and all(hasattr(Backend, r) for r in REQUEST_TYPES)
    assert {k.request for k in KINDS.values()} <= set(DRIVERS)
    assert list(KINDS)[:4] == ["qa", "checklist", "multiple_choice", "perplexity"]
