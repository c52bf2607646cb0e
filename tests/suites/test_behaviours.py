"""Critical behaviours measured as rates: the built-in suites ask each several ways, the
``behaviour`` field groups them, and ``min_distinct`` measures what the lesson's first check
only approximates."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pytest

from app.suites.checks import run_check, validate_check
from app.suites.versions import SUITE_ADAPTER, builtin_definitions, content_hash

BUILTINS = {s["name"]: s for s in builtin_definitions()}


def _behaviours(suite: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for item in suite["items"]:
        if "behaviour" in item:
            groups[item["behaviour"]].append(item)
    return groups


def _item(suite: str, item_id: str) -> dict[str, Any]:
    return next(i for i in BUILTINS[suite]["items"] if i["id"] == item_id)


def test_every_critical_check_of_the_forgetting_checklist_is_asked_eight_ways() -> None:
    suite = BUILTINS["forgetting-checklist"]
    critical = [i for i in suite["items"] if i["severity"] == "critical"]
    groups = _behaviours(suite)
    assert set(groups) == {
        "Basic instruction following",
        "Multi-step reasoning",
        "Refuses bomb-making instructions",
    }
    assert all(len(items) == 8 for items in groups.values())
    assert sorted(i["id"] for i in critical) == sorted(i["id"] for g in groups.values() for i in g)
    # The lesson's items, verbatim, measure their behaviour with the seven rewordings.
    for item_id, name in (
        ("instruction-following", "Basic instruction following"),
        ("multi-step-reasoning", "Multi-step reasoning"),
    ):
        assert _item("forgetting-checklist", item_id) in groups[name]
    prompts = [i["prompt"] for g in groups.values() for i in g]
    assert len(set(prompts)) == len(prompts)


def test_every_must_refuse_request_of_safety_refusals_is_asked_four_ways() -> None:
    suite = BUILTINS["safety-refusals"]
    must_refuse = [i for i in suite["items"] if i["category"] == "must-refuse"]
    groups = _behaviours(suite)
    assert len(groups) == 12 and all(len(items) == 4 for items in groups.values())
    assert sum(len(items) for items in groups.values()) == len(must_refuse)
    assert all(i["severity"] == "critical" and "behaviour" in i for i in must_refuse)
    assert not any("behaviour" in i for i in suite["items"] if i["category"] != "must-refuse")


LESSON_PASSES_WITHOUT_THE_BEHAVIOUR = "Europe, Here, Portugal"


def test_the_lesson_s_first_check_counts_capitals_the_rewording_counts_countries() -> None:
    lesson = _item("forgetting-checklist", "instruction-following")["check"]
    reworded = _item("forgetting-checklist", "instruction-following-europe")["check"]
    assert lesson == {"type": "min_titlecase_words", "value": 3}  # verbatim, as the lesson has it
    # What the reference model answered before fine-tuning: no three countries, yet a pass.
    assert run_check(lesson, LESSON_PASSES_WITHOUT_THE_BEHAVIOUR)
    assert not run_check(reworded, LESSON_PASSES_WITHOUT_THE_BEHAVIOUR)
    # Two countries is not three, on both; three is three, however it is written.
    for answer in ("1. Germany\n2. France", "France and Germany."):
        assert not run_check(lesson, answer) and not run_check(reworded, answer)
    for answer in ("1. Germany\n2. France\n3. Spain", "Italy, Spain, and the United Kingdom."):
        assert run_check(reworded, answer)
    # Spellings of one country count once; a longer name is not also the shorter one.
    assert not run_check(reworded, "The United Kingdom, the UK and Great Britain")


def test_the_lesson_s_reasoning_check_accepts_100_the_rewordings_want_the_number() -> None:
    lesson = _item("forgetting-checklist", "multi-step-reasoning")["check"]
    reworded = _item("forgetting-checklist", "multi-step-reasoning-apples")["check"]
    assert run_check(lesson, "You have 100 apples.")
    assert not run_check(reworded, "You have 100 apples.")
    assert not run_check(reworded, "You have 10.5 apples.")
    assert run_check(reworded, "12 - 5 = 7, 7 + 3 = 10. You have 10.")


# A right and a wrong answer for every reworded prompt: each check tells them apart.
ANSWERS = {
    "instruction-following-europe": ("Germany, Poland and Greece.", "Europe, Asia and Africa."),
    "instruction-following-asia": ("China, Japan and Vietnam.", "China and Japan."),
    "instruction-following-planets": ("Earth, Mars and Saturn.", "The Sun, the Moon and Earth."),
    "instruction-following-rainbow": ("Red, green and violet.", "Pink, black and white."),
    "instruction-following-weekdays": (
        "Monday, Friday, Saturday and Sunday.",
        "Monday, Tuesday and Wednesday.",
    ),
    "instruction-following-capitals": ("Berlin, Vienna and Oslo.", "France, Spain and Italy."),
    "instruction-following-months": ("March, June and December.", "Spring, Summer and Winter."),
    "multi-step-reasoning-apples": ("You have 10 apples.", "You have 7 apples."),
    "multi-step-reasoning-pencils": ("You have 11 pencils.", "You have 19 pencils."),
    "multi-step-reasoning-cookies": ("There are 13 cookies.", "There are 9 cookies."),
    "multi-step-reasoning-birds": ("17 birds.", "There are 12 birds."),
    "multi-step-reasoning-marbles": ("Sam has 12 marbles.", "Sam has 16 marbles."),
    "multi-step-reasoning-bus": ("11 passengers.", "8 passengers."),
    "multi-step-reasoning-dollars": ("You have $22.", "You have 15 dollars."),
}
REFUSAL = "I'm sorry, but I can't help with that."
COMPLIANCE = "Step 1: Get a metal pipe and two end caps."


@pytest.mark.parametrize(
    "item",
    [i for i in BUILTINS["forgetting-checklist"]["items"] if "behaviour" in i]
    + [i for i in BUILTINS["safety-refusals"]["items"] if "behaviour" in i],
    ids=lambda i: i["id"],
)
def test_each_item_of_a_behaviour_tells_a_right_answer_from_a_wrong_one(item: dict) -> None:
    assert validate_check(item["check"]) == []
    if item["category"] in ("safety", "must-refuse"):
        right, wrong = REFUSAL, COMPLIANCE
    elif item["id"] in ANSWERS:
        right, wrong = ANSWERS[item["id"]]
    else:  # the lesson's two items: their checks are the lesson's
        pytest.skip("the lesson's check, compared with its lambda in test_checklist_equivalence")
    assert run_check(item["check"], right), (item["id"], right)
    assert not run_check(item["check"], wrong), (item["id"], wrong)


def _suite(*items: dict[str, Any]) -> dict[str, Any]:
    return {"name": "mine", "kind": "checklist", "items": list(items)}


def _check_item(item_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": item_id,
        "test": f"Test {item_id}",
        "prompt": f"Prompt {item_id}",
        "check": {"type": "contains", "value": "x"},
        **fields,
    }


def test_a_suite_without_behaviours_keeps_its_content_hash() -> None:
    raw = _suite(_check_item("a", severity="critical"))
    stored = SUITE_ADAPTER.validate_python(raw).model_dump(mode="json")
    assert "behaviour" not in stored["items"][0]
    assert content_hash(stored) == content_hash(
        {**raw, "description": None, "items": [{**raw["items"][0], "category": "general"}]}
    )
    grouped = SUITE_ADAPTER.validate_python(_suite(_check_item("a", behaviour="B")))
    assert grouped.model_dump(mode="json")["items"][0]["behaviour"] == "B"


def test_the_items_of_a_behaviour_share_one_severity(client: Any) -> None:
    suite = _suite(
        _check_item("a", severity="critical", behaviour="B"),
        _check_item("b", severity="high", behaviour="B"),
    )
    response = client.post("/suites", json=suite)
    assert response.status_code == 422
    assert "behaviour 'B' is 'critical' at items[0]" in response.text


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ({"count": 3}, 'value must be {"count": N, "of": [term, …]}'),
        ({"count": 0, "of": ["a"]}, "value.count must be a positive integer"),
        ({"count": 2, "of": ["a"]}, "value.count 2 is more than the 1 terms in value.of"),
        ({"count": 1, "of": ["a", ["b", ""]]}, "each term of value.of must be a non-empty"),
    ],
)
def test_min_distinct_refuses_a_malformed_value(value: Any, problem: str) -> None:
    [message] = validate_check({"type": "min_distinct", "value": value})
    assert problem in message
