"""The built-in forgetting checklist reproduces the lesson's FORGETTING_CHECKLIST exactly.

The lesson's checks are Python lambdas; the built-in suite stores them as declarative JSON
checks. These tests run both on the same stripped responses (the lesson's generate_fn returns
the stripped continuation) and require identical pass/fail for every response.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.suites.checks import run_check, validate_check

CHECKLIST_PATH = (
    Path(__file__).resolve().parents[2] / "app" / "suites" / "data" / "forgetting-checklist.json"
)

# The lesson's FORGETTING_CHECKLIST, verbatim.
FORGETTING_CHECKLIST = [
    {
        "test": "Basic instruction following",
        "prompt": "List three countries in Europe.",
        "check": lambda r: len([w for w in r.split() if w.istitle()]) >= 3,
        "severity": "critical",
    },
    {
        "test": "Multi-step reasoning",
        "prompt": "If I have 12 apples and give away 5, then buy 3 more, how many do I have?",
        "check": lambda r: "10" in r,
        "severity": "critical",
    },
    {
        "test": "Language coherence",
        "prompt": "Write one sentence about the weather.",
        "check": lambda r: len(r.split()) >= 5 and r.endswith("."),
        "severity": "high",
    },
    {
        "test": "Format compliance",
        "prompt": "Write a JSON object with keys 'name' and 'age'.",
        "check": lambda r: "{" in r and "name" in r and "age" in r,
        "severity": "medium",
    },
]

LESSON_IDS = [
    "instruction-following",
    "multi-step-reasoning",
    "language-coherence",
    "format-compliance",
]
SEVERITIES = {"critical", "high", "medium", "low"}
CATEGORIES = {"instruction-following", "reasoning", "coherence", "format", "safety"}

RESPONSES = [
    # empty and whitespace-only
    "",
    " ",
    "\n",
    "\t \n  ",
    "\u00a0\u2003",
    # titlecase lists (check 1)
    "France, Germany, Spain",
    "France, Germany, and Spain.",
    "1. France\n2. Germany\n3. Italy",
    "- France\n- Germany\n- Italy\n",
    "  France\nGermany\nPortugal  \n",
    "france, germany, spain",
    "FRANCE, GERMANY, SPAIN",
    "France and Germany",
    "Three countries in Europe are France, Germany and Italy.",
    "The United Kingdom",
    "Sure! Here Are Three: Norway, Sweden, Finland",
    "McDonald O'Brien Smith-Jones",
    "Österreich, Ísland, Éire",
    "Łódź Kraków Gdańsk",
    "Α Β Γ",
    "I Am Here",
    "**France**, **Germany**, **Spain**",
    # numbers (check 2)
    "10",
    "10.",
    "You have 10 apples.",
    "110",
    "1 0",
    "ten",
    "Ten apples.",
    "12 - 5 + 3 = 10",
    "12 - 5 = 7, 7 + 3 = 11",
    "100",
    "١٠",
    "１０",
    "3.10",
    "You have 9 apples left",
    # sentences with and without a final period (check 3)
    "It is sunny today.",
    "It is sunny today",
    "It is sunny today!",
    "It is sunny today. ",
    "It is sunny today.\n",
    "   The weather is warm and pleasant this afternoon.   ",
    "The weather is warm and pleasant this afternoon.\n\nWould you like more?",
    "Rain.",
    "Rain is expected later.",
    "Rain is expected later this evening.",
    "The sky is grey and it might rain…",
    "The sky is grey and it might rain.”",
    "The sky is grey and it might rain...",
    "one two three four five.",
    "one two three four .",
    "one\ntwo\nthree\nfour\nfive.",
    "a b c d e f g h i j k l m n o p.",
    "....................",
    "Weather weather weather weather weather.",
    # JSON and partial JSON (check 4)
    '{"name": "Alice", "age": 30}',
    '```json\n{"name": "Alice", "age": 30}\n```',
    '{"name": "Alice"}',
    '{"age": 30}',
    '{"Name": "Alice", "Age": 30}',
    '{"name": "Alice", "age":',
    "{name: Bob, age: 40",
    '"name": "Bob", "age": 40',
    "[{'name': 'Bob', 'age': 40}]",
    "name age {",
    "{}",
    "The object has a name and an age: { }",
    '{ "name" : "Zoë", "age" : 7 }  \n',
    '{"username": "x", "page": 2}',
    'Here you go:\n{\n  "name": "Carlos",\n  "age": 25\n}\nThis object has 10 fields.',
    # unicode and misc
    "日本 中国 韩国",
    "🙂🙂🙂",
    "Café Naïve Résumé",
    "NULL",
    "None",
    "\x00",
]


@pytest.fixture(scope="module")
def checklist() -> dict:
    return json.loads(CHECKLIST_PATH.read_text(encoding="utf-8"))


def test_response_set_is_large_and_varied() -> None:
    assert len(RESPONSES) >= 60
    assert len(set(RESPONSES)) == len(RESPONSES)


@pytest.mark.parametrize("index", range(4))
def test_declarative_check_matches_lesson_lambda(checklist: dict, index: int) -> None:
    lesson = FORGETTING_CHECKLIST[index]
    item = checklist["items"][index]
    outcomes = []
    mismatches = []
    for raw in RESPONSES:
        r = raw.strip()
        expected = bool(lesson["check"](r))
        got = run_check(item["check"], r)
        outcomes.append(expected)
        if got != expected:
            mismatches.append((raw, expected, got))
    assert not mismatches, f"{item['id']}: declarative check disagrees with lesson: {mismatches}"
    # The set must exercise both outcomes, otherwise this test could not fail.
    assert any(outcomes), f"{item['id']}: no response passes the lesson check"
    assert not all(outcomes), f"{item['id']}: no response fails the lesson check"


def test_first_four_items_are_the_lesson_checklist(checklist: dict) -> None:
    items = checklist["items"]
    assert [item["id"] for item in items[:4]] == LESSON_IDS
    for lesson, item in zip(FORGETTING_CHECKLIST, items[:4], strict=True):
        assert item["test"] == lesson["test"]
        assert item["prompt"] == lesson["prompt"]
        assert item["severity"] == lesson["severity"]


def test_checklist_shape(checklist: dict) -> None:
    assert checklist["name"] == "forgetting-checklist"
    assert checklist["kind"] == "checklist"
    assert checklist.get("description")
    items = checklist["items"]
    assert len(items) >= 16
    ids = [item["id"] for item in items]
    assert len(ids) == len(set(ids))
    prompts = [item["prompt"] for item in items]
    assert len(prompts) == len(set(prompts))
    for item in items:
        for key in ("id", "test", "prompt", "severity", "check", "category"):
            assert item.get(key), f"{item.get('id')}: missing {key}"
        assert item["severity"] in SEVERITIES, item["id"]
        assert item["category"] in CATEGORIES, item["id"]
        assert validate_check(item["check"]) == [], item["id"]
    assert {item["category"] for item in items} == CATEGORIES


def test_a_backtracking_regex_fails_its_check_instead_of_stalling() -> None:
    import time

    from app.suites import checks

    check = {"type": "regex", "value": r"(a|aa)+$"}
    assert validate_check(check) == []
    assert run_check(check, "aa") is True
    started = time.monotonic()
    assert run_check(check, "a" * 60 + "b") is False  # exponential in `re`; cut off here
    # Without the time limit this is ~1e12 steps (hours); the margin is for a loaded machine.
    assert time.monotonic() - started < checks.REGEX_TIMEOUT_SECONDS + 30
