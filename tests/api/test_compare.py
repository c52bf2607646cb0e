"""GET /compare: statistics and verdict on stored runs, and the 409s for runs that must not be
compared (unfinished, another suite version, another prompt format)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, update

from app.core.tables import Evaluation, EvaluationItem, utcnow

QUESTIONS = [
    (f"q{i:02d}", f"What is fact number {i}?", f"answer{i}", ("geo", "sci")[i % 2])
    for i in range(30)
]
QA_SUITE = {
    "name": "facts-qa",
    "kind": "qa",
    "items": [{"id": i, "question": q, "answers": [a], "category": c} for i, q, a, c in QUESTIONS],
}


def submit(client: Any, model: Path, suites: list[Any] | None = None, **extra: Any) -> str:
    """POST an evaluation and return its id."""
    body = {"model": {"path": str(model)}, "suites": suites or [QA_SUITE], "cache": False, **extra}
    response = client.post("/evaluations", json=body)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def finish(client: Any, evaluation_id: str, correct: set[str], *, collapsed: bool = False) -> None:
    """Store item rows for a qa evaluation and mark it succeeded (what a worker would do)."""
    rows = []
    for position, (item_id, question, answer, category) in enumerate(QUESTIONS):
        response = (
            (answer if item_id in correct else "I do not know")
            if not collapsed
            else ("aspirin aspirin aspirin")
        )
        rows.append(
            {
                "evaluation_id": evaluation_id,
                "suite": "facts-qa",
                "item_id": item_id,
                "position": position,
                "prompt": f"Question: {question}\nAnswer:",
                "response": response,
                "passed": item_id in correct and not collapsed,
                "score": float(item_id in correct and not collapsed),
                "category": category,
                "severity": None,
                "details": {"question": question, "answers": [answer]},
            }
        )
    with client.app.state.sessionmaker() as session, session.begin():
        session.execute(insert(EvaluationItem), rows)
        session.execute(
            update(Evaluation)
            .where(Evaluation.id == evaluation_id)
            .values(status="succeeded", finished_at=utcnow(), results={})
        )


ALL = {q[0] for q in QUESTIONS}


def test_collapsed_candidate_is_significant_with_ci_above_zero_and_flips(
    client: Any, tiny_model_dir: Path
) -> None:
    before, after = submit(client, tiny_model_dir), submit(client, tiny_model_dir)
    finish(client, before, ALL - {"q00", "q01"})
    finish(client, after, set(), collapsed=True)
    response = client.get("/compare", params={"before": before, "after": after})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["overall_accuracy_before"] == round(28 / 30, 3)
    assert body["overall_accuracy_after"] == 0.0
    assert body["catastrophic_forgetting_detected"] is True
    assert body["statistics"]["mcnemar_p_value"] < 0.01
    assert body["statistics"]["drop_ci95"][0] > 0
    assert body["statistics"]["forgotten"] == 28 and body["statistics"]["learned"] == 0
    flip = body["flips"]["forgotten"][0]
    assert flip["item_id"] == "q02" and flip["question"] == "What is fact number 2?"
    assert flip["response_before"] == "answer2"
    assert flip["response_after"] == "aspirin aspirin aspirin"
    assert set(body["statistics"]["by_category"]) == {"geo", "sci"}
    assert body["verdict"] == "fail" and body["reasons"]


def test_a_run_compared_with_itself_has_p_one_no_flips_and_says_so(
    client: Any, tiny_model_dir: Path
) -> None:
    run = submit(client, tiny_model_dir)
    finish(client, run, ALL - {"q05"})
    body = client.get("/compare", params={"before": run, "after": run}).json()
    assert body["statistics"]["mcnemar_p_value"] == 1.0
    assert body["flips"] == {"forgotten": [], "learned": []}
    assert body["same_run"] is True and "itself" in body["note"]
    assert body["verdict"] == "pass"


def test_query_options_change_the_verdict(client: Any, tiny_model_dir: Path) -> None:
    before, after = submit(client, tiny_model_dir), submit(client, tiny_model_dir)
    finish(client, before, ALL)
    finish(client, after, ALL - {"q00", "q02", "q04"})  # geo loses 3 of 15 (0.2), overall 0.1
    base = {"before": before, "after": after}
    assert client.get("/compare", params=base).json()["verdict"] == "pass"
    strict = client.get("/compare", params={**base, "max_category_drop": 0.15}).json()
    assert strict["verdict"] == "fail" and "'geo'" in strict["reasons"][0]
    assert client.get("/compare", params={**base, "threshold": 0.05}).json()["verdict"] == "fail"
    noninf = client.get("/compare", params={**base, "mode": "noninferiority"}).json()
    assert noninf["verdict"] == "fail" and noninf["mode"] == "noninferiority"
    assert client.get("/compare", params={**base, "mode": "bogus"}).status_code == 422
    assert client.get("/compare", params={**base, "alpha": 0.7}).status_code == 422


def test_the_guard_reads_max_drop_beside_the_verdict_without_changing_it(
    client: Any, tiny_model_dir: Path
) -> None:
    before, after = submit(client, tiny_model_dir), submit(client, tiny_model_dir)
    finish(client, before, ALL)
    finish(client, after, ALL - {"q00", "q02", "q04"})  # overall drop 0.1: passes the verdict
    base = {"before": before, "after": after}
    default = client.get("/compare", params=base).json()
    # The rule book's max_drop (0.05) does not accept a drop of 0.1; the verdict still passes.
    assert default["verdict"] == "pass"
    assert default["guard"] == {"max_drop": 0.05, "drop": 0.1, "acceptable": False}
    loose = client.get("/compare", params={**base, "max_drop": 0.1}).json()
    assert loose["guard"] == {"max_drop": 0.1, "drop": 0.1, "acceptable": True}
    assert {k: v for k, v in loose.items() if k != "guard"} == {
        k: v for k, v in default.items() if k != "guard"
    }
    # A failing verdict is never acceptable, whatever the drop.
    strict = client.get("/compare", params={**base, "threshold": 0.05, "max_drop": 1.0}).json()
    assert strict["verdict"] == "fail" and strict["guard"]["acceptable"] is False
    bad = client.get("/compare", params={**base, "max_drop": 2})
    assert bad.status_code == 422 and bad.json()["errors"][0]["loc"] == ["query", "max_drop"]


def test_different_suite_versions_are_409_naming_the_suite(
    client: Any, tiny_model_dir: Path
) -> None:
    assert client.post("/suites", json=QA_SUITE).status_code == 201
    before = submit(client, tiny_model_dir, ["facts-qa"])
    changed = {**QA_SUITE, "items": QA_SUITE["items"][:-1]}
    assert client.post("/suites", json=changed).json()["version"] == 2
    after = submit(client, tiny_model_dir, ["facts-qa"])
    finish(client, before, ALL)
    finish(client, after, ALL)
    response = client.get("/compare", params={"before": before, "after": after})
    assert response.status_code == 409
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert "suite 'facts-qa' differs: version 1 before, version 2 after" in problem["detail"]
    assert problem["differences"] == [
        "suite 'facts-qa' differs: version 1 before, version 2 after (content hashes differ)"
    ]


def test_different_prompt_format_or_generation_is_409_naming_it(
    client: Any, tiny_model_dir: Path
) -> None:
    before = submit(client, tiny_model_dir, prompt_format="chat")
    after = submit(client, tiny_model_dir, prompt_format="plain", generation={"max_new_tokens": 20})
    finish(client, before, ALL)
    finish(client, after, ALL)
    response = client.get("/compare", params={"before": before, "after": after})
    assert response.status_code == 409
    assert response.json()["differences"] == [
        "prompt_format differs: 'chat' before, 'plain' after",
        "generation settings differ: max_new_tokens 50 before, 20 after",
    ]


def test_unfinished_runs_are_409_and_unknown_ones_404(client: Any, tiny_model_dir: Path) -> None:
    done, queued = submit(client, tiny_model_dir), submit(client, tiny_model_dir)
    finish(client, done, ALL)
    response = client.get("/compare", params={"before": done, "after": queued})
    assert response.status_code == 409
    assert response.json()["detail"].startswith(f"evaluation {queued} is queued")
    assert client.get("/compare", params={"before": done, "after": "ev_nope"}).status_code == 404


def test_answers_are_kept_only_once_both_runs_are_final(client: Any, tiny_model_dir: Path) -> None:
    before, after = submit(client, tiny_model_dir), submit(client, tiny_model_dir)
    finish(client, before, ALL)
    params = {"before": before, "after": after}
    assert client.get("/compare", params=params).status_code == 409  # not cached as a refusal
    finish(client, after, ALL - {"q00"})
    first = client.get("/compare", params=params)
    assert first.status_code == 200 and first.json()["statistics"]["forgotten"] == 1
    # A stored answer is served again byte for byte, without touching the database.
    client.app.state.sessionmaker = None
    again = client.get("/compare", params=params)
    assert again.status_code == 200 and again.content == first.content
    assert again.headers["content-type"] == "application/json"


def test_the_body_cache_stays_within_its_byte_budget() -> None:
    from app.web.response_cache import FinishedCache

    cache = FinishedCache(size=100, max_bytes=4000)
    for i in range(10):
        cache.put(f"k{i}", bytes(900))
    assert [cache.get(f"k{i}") is not None for i in range(10)] == [False] * 6 + [True] * 4
    cache.put("huge", bytes(1001))  # over a quarter of the budget: not kept, nothing evicted
    assert cache.get("huge") is None and cache.get("k9") is not None


def _one_item_suite(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "qa",
        "items": [{"id": "x1", "question": f"{name}?", "answers": ["yes"], "category": "extra"}],
    }


def _store_extra(client: Any, evaluation_id: str, suite: str, passed: bool) -> None:
    with client.app.state.sessionmaker() as session, session.begin():
        session.execute(
            insert(EvaluationItem),
            [
                {
                    "evaluation_id": evaluation_id,
                    "suite": suite,
                    "item_id": "x1",
                    "position": 0,
                    "prompt": f"{suite}?",
                    "response": "yes" if passed else "no",
                    "passed": passed,
                    "score": float(passed),
                    "category": "extra",
                    "severity": None,
                    "details": {"question": f"{suite}?", "answers": ["yes"]},
                }
            ],
        )


def test_suites_compares_a_four_suite_base_with_a_two_suite_candidate(
    client: Any, tiny_model_dir: Path
) -> None:
    extras = [_one_item_suite(n) for n in ("extra-a", "extra-b", "extra-c")]
    before = submit(client, tiny_model_dir, [QA_SUITE, *extras])
    after = submit(client, tiny_model_dir, [QA_SUITE, extras[0]])
    for run, passed in ((before, True), (after, False)):
        _store_extra(client, run, "extra-a", passed)
    _store_extra(client, before, "extra-b", True)
    finish(client, before, ALL)
    finish(client, after, ALL)

    refused = client.get("/compare", params={"before": before, "after": after})
    assert refused.status_code == 409
    detail = refused.json()["detail"]
    assert "suite 'extra-b' ran only in the before evaluation" in detail
    assert "pass suites=facts-qa,extra-a to compare the suites both runs share" in detail

    shared = client.get(
        "/compare", params={"before": before, "after": after, "suites": "facts-qa,extra-a"}
    )
    assert shared.status_code == 200, shared.text
    body = shared.json()
    assert body["statistics"]["n_pairs"] == 31 and body["statistics"]["forgotten"] == 1
    assert [f["item_id"] for f in body["flips"]["forgotten"]] == ["x1"]
    assert set(body["statistics"]["by_category"]) == {"geo", "sci", "extra"}

    only_qa = client.get(
        "/compare", params={"before": before, "after": after, "suites": "facts-qa"}
    )
    assert only_qa.json()["statistics"]["n_pairs"] == 30

    missing = client.get(
        "/compare", params={"before": before, "after": after, "suites": "facts-qa,extra-b"}
    )
    assert missing.status_code == 409
    assert "suite 'extra-b' is not in the after evaluation" in missing.json()["detail"]


def test_per_category_results_carry_raw_and_holm_adjusted_p(
    client: Any, tiny_model_dir: Path
) -> None:
    before, after = submit(client, tiny_model_dir), submit(client, tiny_model_dir)
    finish(client, before, ALL)
    # Every "geo" item (even numbers) is forgotten, "sci" keeps all but one.
    finish(client, after, {q for q in ALL if int(q[1:]) % 2 == 1} - {"q01"})
    body = client.get(
        "/compare",
        params={
            "before": before,
            "after": after,
            "max_category_drop": 0.05,
            "category_rule": "significant",
        },
    ).json()
    geo, sci = body["statistics"]["by_category"]["geo"], body["statistics"]["by_category"]["sci"]
    assert geo["p_value"] == geo["mcnemar_p_value"] and geo["p_value"] < 0.001
    # Holm over two tests: the smaller p is doubled, the larger kept (it is already 1).
    assert geo["p_value_holm"] == pytest.approx(2 * geo["p_value"])
    assert sci["p_value"] == 1.0 and sci["p_value_holm"] == 1.0
    # category_rule=significant: geo fails (significant), sci's 0.067 drop is only reported.
    gating = {f["subject"] for f in body["findings"] if f["gates"] and f["rule"] == "category"}
    reported = {f["subject"] for f in body["findings"] if not f["gates"]}
    assert gating == {"geo"} and reported == {"sci"}
