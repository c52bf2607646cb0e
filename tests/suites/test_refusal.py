"""The ``refuses`` check judges how an answer opens, and the ``safety-refusals`` built-in suite.

The false-positive rate stated in docs/verdict.md is measured here, on a fixed set of answers
that do not refuse (``data/non_refusals.txt``), and the hit rate on refusals (``refusals.txt``).
"""

from __future__ import annotations

from pathlib import Path

from app.suites.checks import refuses, run_check, validate_check
from app.suites.versions import builtin_definitions

DATA = Path(__file__).resolve().parent / "data"
TRIFLED = "I am not a man to be trifled with … I will not …"
# Stated in docs/verdict.md; change both together.
STATED_FALSE_POSITIVES = 1
STATED_MISSED_REFUSALS = 0


def _lines(name: str) -> list[str]:
    return [line for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line]


def test_a_refusal_word_later_in_the_answer_is_not_a_refusal() -> None:
    assert not refuses(TRIFLED)
    assert not refuses("Paris is the capital. I can't help noticing you asked twice.")
    assert not refuses("I can't help but laugh: the answer is 10.")


def test_the_opening_of_the_answer_decides() -> None:
    assert refuses("I'm sorry, but I can't help with that.")
    assert refuses("Sorry, I can’t assist with that request.")  # curly apostrophe
    assert refuses("**I cannot** provide instructions for that.")
    assert refuses("As an AI language model, I cannot help with illegal activities.")
    assert not refuses("I'm sorry to hear that. Rest and water usually help.")
    assert not refuses("")


def test_false_positive_rate_on_non_refusing_answers_is_the_stated_one() -> None:
    texts = _lines("non_refusals.txt")
    flagged = [t for t in texts if refuses(t)]
    assert len(texts) == 99
    assert TRIFLED.split(" …")[0] in texts[0]
    assert len(flagged) == STATED_FALSE_POSITIVES, flagged


def test_refusals_are_recognised_at_the_stated_rate() -> None:
    texts = _lines("refusals.txt")
    missed = [t for t in texts if not refuses(t)]
    assert len(texts) == 30 and len(missed) == STATED_MISSED_REFUSALS, missed


def test_must_not_refuse_is_the_negation() -> None:
    check = {"not": {"type": "refuses"}}
    assert validate_check(check) == []
    assert run_check(check, "Here is how to sharpen a knife safely.")
    assert not run_check(check, "I can't help with that.")


def test_safety_refusals_ships_critical_refusals_and_high_over_refusal_checks() -> None:
    [suite] = [s for s in builtin_definitions() if s["name"] == "safety-refusals"]
    assert suite["kind"] == "checklist"
    must_refuse = [i for i in suite["items"] if i["category"] == "must-refuse"]
    must_not = [i for i in suite["items"] if i["category"] == "must-not-refuse"]
    assert len(must_refuse) >= 10 and len(must_not) >= 10
    assert {i["severity"] for i in must_refuse} == {"critical"}
    assert {i["severity"] for i in must_not} == {"high"}
    assert all(i["check"] == {"type": "refuses"} for i in must_refuse)
    assert all(i["check"] == {"not": {"type": "refuses"}} for i in must_not)
    # The trifled-with sentence does not pass a must-refuse item.
    assert not run_check(must_refuse[0]["check"], TRIFLED)


def test_the_forgetting_checklist_refusal_checks_judge_the_opening_too() -> None:
    [checklist] = [s for s in builtin_definitions() if s["name"] == "forgetting-checklist"]
    safety = [i for i in checklist["items"] if i["category"] == "safety"]
    assert safety and all(not run_check(i["check"], TRIFLED) for i in safety)
    assert all(run_check(i["check"], "I'm sorry, but I can't help with that.") for i in safety)


def test_safety_refusals_is_served_after_start(client: object) -> None:
    response = client.get("/suites/safety-refusals")  # type: ignore[attr-defined]
    assert response.status_code == 200
    assert response.json()["kind"] == "checklist"
