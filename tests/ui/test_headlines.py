"""Every surface states the verdict in the same words: ``/compare``, the compare page, the
fine-tune job page and the gate (its last stderr line and its Markdown), for a pass, a fail by
accuracy, a fail by a critical behaviour and a fail by drift.

The words come from one function (``app.comparison.verdict.verdict_words``) and travel in the
``/compare`` body as ``headline`` and ``recommendation``; the pages show them instead of
composing their own, so a FAIL caused by the checklist never reads like an accuracy verdict.
"""

from __future__ import annotations

import html
import io
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.comparison import service as comparison
from app.comparison.verdict import CompareOptions
from app.core.tables import FinetuneJob
from app.suites.kinds.qa import LESSON_FORGOT, LESSON_PRESERVED
from forgetguard.gate.options import GateOptions
from forgetguard.gate.run import EXIT_FAIL, EXIT_PASS, run_gate
from forgetguard.rules import CompareRules
from tests.ui.seed import (
    BASE_RATES,
    CHECKLIST_BEFORE,
    _checklist_rows,
    _evaluation,
    _perplexity_rows,
    _qa_rows,
    _suites,
    seed_finetune_job,
)

# The instruction-following behaviour answered the way the lesson's check lets through.
LOST_INSTRUCTIONS = {
    item_id: "Europe, Here, Portugal"
    for item_id in CHECKLIST_BEFORE
    if item_id.startswith("instruction-following")
}


def _seed(
    session: Session,
    *,
    forget: float = 0.0,
    checklist: dict[str, str] | None = None,
    nll_after: float = 3.48,
    rules: dict[str, Any] | None = None,
) -> tuple[str, str, str]:
    """A base run and a candidate (``forget``: share of right answers lost; ``checklist``:
    answers that replace the base's; ``nll_after``: NLL/token on general text), and a
    fine-tune job whose stored comparison is what the worker computes under ``rules``."""
    rng = random.Random(5)
    suites = _suites(session)
    before_qa = _qa_rows(suites["general-qa"], BASE_RATES, rng, collapsed=False)
    right = [r["item_id"] for r in before_qa if r["passed"]]
    lost = set(rng.sample(right, round(forget * len(right))))
    keep = {i for i in right if i not in lost}
    after_qa = _qa_rows(suites["general-qa"], 0.0, random.Random(5), collapsed=False, keep=keep)
    text = suites["general-text"]
    runs = []
    for label, qa, answers, nll in (
        ("base", before_qa, CHECKLIST_BEFORE, 3.48),
        ("candidate", after_qa, {**CHECKLIST_BEFORE, **(checklist or {})}, nll_after),
    ):
        runs.append(
            _evaluation(
                session,
                suites,
                label=label,
                model_path="models/smollm2-135m-instruct",
                adapter_path=None if label == "base" else "var/artifacts/ft/adapter",
                minutes_ago=30 if label == "base" else 5,
                rows=[
                    *qa,
                    *_checklist_rows(suites["forgetting-checklist"], answers),
                    *_perplexity_rows(text, nll, 0.0, random.Random(9)),
                ],
            )
        )
    job_id = seed_finetune_job(session, runs[0], runs[1])
    session.commit()
    job = session.get(FinetuneJob, job_id)
    assert job is not None
    job.comparison = comparison.compare(
        session=session,
        before_id=runs[0],
        after_id=runs[1],
        options=CompareOptions(n_resamples=200, **(rules or {})),
    )
    session.commit()
    return runs[0], runs[1], job_id


def _banner(page: str) -> tuple[str, str]:
    """The verdict word and the headline of a page's verdict banner."""
    word = re.search(r'<div class="verdict-word">(.*?)</div>', page, re.S)
    title = re.search(r'<p class="verdict-title" id="headline">(.*?)</p>', page, re.S)
    assert word and title, page[:2000]
    return html.unescape(word.group(1)).strip(), html.unescape(title.group(1)).strip()


CASES = {
    "pass": ({}, "PASS: no forgetting rule failed; accuracy ", LESSON_PRESERVED),
    "fail-by-accuracy": ({"forget": 0.3}, "FAIL: accuracy dropped ", LESSON_FORGOT),
    "fail-by-check": (
        {"checklist": LOST_INSTRUCTIONS},
        "FAIL: critical behaviour 'Basic instruction following' fell from 8/8 to 1/8 (p = 0.016)",
        "A critical behaviour was lost (forgetting-checklist/Basic instruction following): "
        "reduce learning rate and epochs, replay general instruction data, or switch to LoRA",
    ),
    "fail-by-drift": (
        {"nll_after": 4.2, "rules": {"max_nll_increase": 0.1}},
        "FAIL: NLL/token on 'general-text' rose 20.7% (3.480 → 4.200), more than 10%",
        "The model drifted from the base on general text (general-text): reduce learning rate "
        "and epochs, add replay, or switch to LoRA",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compare_json_pages_and_gate_say_the_same_thing(
    client: TestClient, db: Callable[[], Session], case: str, tmp_path: Path
) -> None:
    setup, starts, recommendation = CASES[case]
    rules = setup.get("rules", {})
    with db() as session:
        before, after, job_id = _seed(session, **setup)
    query = {"before": before, "after": after, **rules}
    body = client.get("/compare", params=query).json()
    headline = body["headline"]
    assert headline.startswith(starts), headline
    assert body["recommendation"] == recommendation
    assert body["verdict"] == ("pass" if case == "pass" else "fail")
    if case != "pass":
        assert headline == f"FAIL: {body['reasons'][0]}"

    compare_page = client.get("/ui/compare", params=query).text
    job_page = client.get(f"/ui/finetune-jobs/{job_id}").text
    word = "✓ PASS" if case == "pass" else "✗ FAIL"
    assert _banner(compare_page) == (word, headline)
    assert _banner(job_page) == (word, headline)
    assert body["recommendation"] in html.unescape(compare_page)
    # What the headline counts as reported is listed on both pages.
    reported = [f["message"] for f in body["findings"] if not f["gates"]]
    for page in (compare_page, job_page) if reported else ():
        listed = html.unescape(page.split('<ul class="reported small">', 1)[1].split("</ul>")[0])
        assert all(message in listed for message in reported)
    # The job stored the comparison the worker computed; it says the same.
    with db() as session:
        job = session.get(FinetuneJob, job_id)
        assert job is not None and job.comparison is not None
        assert (job.comparison["headline"], job.comparison["recommendation"]) == (
            headline,
            recommendation,
        )

    # The gate prints the same words as its last line and at the top of its Markdown.
    err = io.StringIO()
    code = run_gate(
        GateOptions(
            before=before,
            after=after,
            rules=CompareRules(**rules),
            markdown=tmp_path / "gate.md",
            poll_seconds=0.05,
            timeout=30,
        ),
        client=client,
        stdout=io.StringIO(),
        stderr=err,
        sleep=lambda _s: None,
    )
    assert code == (EXIT_PASS if case == "pass" else EXIT_FAIL)
    assert err.getvalue().strip().splitlines()[-1] == f"forgetguard gate: {headline}"
    markdown = (tmp_path / "gate.md").read_text(encoding="utf-8")
    assert html.unescape(markdown.splitlines()[4].replace("\\", "")) == f"**{headline}**"

    if case == "fail-by-check":
        # The behaviour's rate is on the page beside the verdict.
        table = compare_page.split('id="behaviours"', 1)[1].split("</table>", 1)[0]
        row = table.split("Basic instruction following", 1)[1].split("</tr>", 1)[0]
        assert "<td>8/8</td>" in row and ">1/8</td>" in row and "<td>0.016</td>" in row
        # General accuracy did not move: nothing on any surface may read like it did.
        assert body["accuracy_drop"] == 0.0
        for text in (headline, body["recommendation"], compare_page, job_page):
            assert "preserved general capabilities" not in text
            assert "accuracy 69% → 69%" not in text and "Forgetting detected:" not in text


def test_a_comparison_stored_before_headlines_gets_them_from_the_same_function(
    client: TestClient, db: Callable[[], Session]
) -> None:
    with db() as session:
        before, after, job_id = _seed(session, checklist=LOST_INSTRUCTIONS)
        job = session.get(FinetuneJob, job_id)
        assert job is not None and job.comparison is not None
        old = {k: v for k, v in job.comparison.items() if k not in ("headline", "findings")}
        old["recommendation"] = LESSON_PRESERVED  # what the lesson's key said then
        job.comparison = old
        session.commit()
    body = client.get("/compare", params={"before": before, "after": after}).json()
    word, headline = _banner(client.get(f"/ui/finetune-jobs/{job_id}").text)
    assert word == "✗ FAIL" and headline == body["headline"]
