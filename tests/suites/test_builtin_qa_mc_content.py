"""Content checks for the built-in general-qa and general-mc suites (JSON only, no app imports)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parents[2] / "app" / "suites" / "data"
QA_PATH = DATA_DIR / "general-qa.json"
MC_PATH = DATA_DIR / "general-mc.json"

LESSON_QUESTIONS = {
    "geo-001": ("What is the capital of France?", ["Paris"], "geography"),
    "math-001": ("What is 15 multiplied by 7?", ["105"], "math"),
    "lit-001": ("Who wrote Hamlet?", ["Shakespeare"], "literature"),
    "sci-001": ("What gas do plants absorb from the air?", ["carbon dioxide", "CO2"], "science"),
    "hist-001": ("What year did World War II end?", ["1945"], "history"),
}


def _load(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as fh:
        return json.load(fh)


def _assert_unique_ids_and_questions(items: list[dict[str, Any]]) -> None:
    ids = [item["id"] for item in items]
    assert len(set(ids)) == len(ids), "duplicate ids"
    questions = [item["question"].strip().lower() for item in items]
    duplicates = {q for q in questions if questions.count(q) > 1}
    assert not duplicates, f"duplicate questions: {sorted(duplicates)}"


def test_general_qa_shape_and_size() -> None:
    suite = _load(QA_PATH)
    assert suite["name"] == "general-qa"
    assert suite["kind"] == "qa"
    assert "{question}" in suite["prompt_template"]
    items = suite["items"]
    assert len(items) >= 200
    categories = {item["category"] for item in items}
    assert len(categories) >= 6


def test_general_qa_lesson_questions_verbatim() -> None:
    by_id = {item["id"]: item for item in _load(QA_PATH)["items"]}
    for item_id, (question, answers, category) in LESSON_QUESTIONS.items():
        assert item_id in by_id, item_id
        item = by_id[item_id]
        assert item["question"] == question
        assert item["category"] == category
        for answer in answers:
            assert answer in item["answers"], (item_id, answer)


def test_general_qa_items_well_formed() -> None:
    items = _load(QA_PATH)["items"]
    _assert_unique_ids_and_questions(items)
    for item in items:
        assert isinstance(item["question"], str) and item["question"].strip(), item["id"]
        assert isinstance(item.get("category"), str) and item["category"].strip(), item["id"]
        answers = item["answers"]
        assert isinstance(answers, list) and len(answers) >= 1, item["id"]
        for answer in answers:
            assert isinstance(answer, str) and answer.strip(), item["id"]


def test_general_mc_items_well_formed() -> None:
    suite = _load(MC_PATH)
    assert suite["name"] == "general-mc"
    assert suite["kind"] == "multiple_choice"
    assert "{question}" in suite["prompt_template"]
    items = suite["items"]
    assert len(items) >= 100
    _assert_unique_ids_and_questions(items)
    for item in items:
        assert isinstance(item["question"], str) and item["question"].strip(), item["id"]
        assert isinstance(item.get("category"), str) and item["category"].strip(), item["id"]
        choices = item["choices"]
        assert isinstance(choices, list) and len(choices) >= 2, item["id"]
        assert all(isinstance(c, str) and c.strip() for c in choices), item["id"]
        assert len(set(choices)) == len(choices), item["id"]
        gold = item["gold"]
        assert isinstance(gold, int) and not isinstance(gold, bool), item["id"]
        assert 0 <= gold < len(choices), item["id"]


def test_general_mc_gold_positions_vary() -> None:
    golds = {item["gold"] for item in _load(MC_PATH)["items"]}
    assert len(golds) > 1
