"""Compare two stored evaluations: load their items, refuse what is not comparable, build the
comparison. Routes, the UI and fine-tune workers all call ``compare``."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.comparison.verdict import CompareOptions, Row, build, comparability_problems
from app.core.errors import Problem
from app.core.tables import Evaluation, EvaluationItem
from app.evaluations import service as evaluations
from app.jobs.status import JobStatus


def _run(row: Evaluation) -> dict[str, Any]:
    return {
        "id": row.id,
        "source": row.cached_from or row.id,
        "suites": row.suites,
        "prompt_format": row.prompt_format,
        "generation": row.generation,
    }


LIGHT = (
    EvaluationItem.suite,
    EvaluationItem.item_id,
    EvaluationItem.passed,
    EvaluationItem.score,
    EvaluationItem.category,
    EvaluationItem.severity,
)
HEAVY = (
    EvaluationItem.suite,
    EvaluationItem.item_id,
    EvaluationItem.response,
    EvaluationItem.details,
    EvaluationItem.prompt,
)
TEXT_KINDS = ("checklist", "perplexity")  # small suites whose every row the comparison reads
CHUNK = 500


def _source(evaluation: Evaluation) -> str:
    return evaluation.cached_from or evaluation.id


def load_pair(
    session: Session, before: Evaluation, after: Evaluation
) -> tuple[list[Row], list[Row]]:
    """Item rows of two finished evaluations (a cached one's are its source's).

    Two passes keep a 10,000-item comparison fast: outcomes of every item first, then texts and
    details only where the comparison shows them — items whose outcome changed, and every row
    of checklist and perplexity suites.
    """
    kinds = {s["name"]: s["kind"] for s in before.suites}
    light = {}
    for run in (before, after):
        light[run.id] = (
            session.connection()
            .execute(
                select(*LIGHT)
                .where(EvaluationItem.evaluation_id == _source(run))
                .order_by(EvaluationItem.suite, EvaluationItem.position)
            )
            .all()
        )
    after_passed = {(suite, item_id): passed for suite, item_id, passed, *_ in light[after.id]}
    wanted: dict[str, set[str]] = {}
    for suite, item_id, passed, *_ in light[before.id]:
        if kinds.get(suite) in TEXT_KINDS or passed != after_passed.get((suite, item_id)):
            wanted.setdefault(suite, set()).add(item_id)

    rows = []
    for run in (before, after):
        heavy: dict[tuple[str, str], Any] = {}
        for suite, ids in wanted.items():
            ordered = sorted(ids)
            for start in range(0, len(ordered), CHUNK):
                for h in session.connection().execute(
                    select(*HEAVY).where(
                        EvaluationItem.evaluation_id == _source(run),
                        EvaluationItem.suite == suite,
                        EvaluationItem.item_id.in_(ordered[start : start + CHUNK]),
                    )
                ):
                    heavy[(h.suite, h.item_id)] = h
        out = []
        for suite, item_id, passed, score, category, severity in light[run.id]:
            texts = heavy.get((suite, item_id))
            out.append(
                Row(
                    item_id,
                    passed,
                    score,
                    category,
                    severity,
                    texts[2] if texts else None,
                    texts[3] if texts else None,
                    suite,
                    kinds.get(suite, ""),
                    texts[4] if texts else "",
                )
            )
        rows.append(out)
    return rows[0], rows[1]


def compare(
    *, session: Session, before_id: str, after_id: str, options: CompareOptions
) -> dict[str, Any]:
    """Load, check comparability (409 naming what differs) and compare two evaluations."""
    before = evaluations.get(session=session, evaluation_id=before_id)
    after = evaluations.get(session=session, evaluation_id=after_id)
    for row in (before, after):
        if row.status != JobStatus.SUCCEEDED:
            raise Problem(
                409,
                "Evaluation not finished",
                f"evaluation {row.id} is {row.status}; only succeeded evaluations can be compared",
                evaluation=row.id,
                evaluation_status=row.status,
            )
    problems = comparability_problems(_run(before), _run(after))
    if problems:
        raise Problem(409, "Evaluations not comparable", "; ".join(problems), differences=problems)
    before_rows, after_rows = load_pair(session, before, after)
    return build(_run(before), _run(after), before_rows, after_rows, options)
