"""Write what a worker would leave behind, straight into the test app's database: item rows and
the evaluation's final fields, in one transaction."""

from __future__ import annotations

from typing import Any

from sqlalchemy import insert, update

from app.core.tables import Evaluation, EvaluationItem, utcnow


def qa_row(
    evaluation_id: str,
    suite: str,
    position: int,
    item: dict[str, Any],
    *,
    response: str,
    passed: bool,
    category: str,
) -> dict[str, Any]:
    """The item row a worker writes for a scored QA ``item``."""
    return {
        "evaluation_id": evaluation_id,
        "suite": suite,
        "item_id": item["id"],
        "position": position,
        "prompt": item["question"],
        "response": response,
        "passed": passed,
        "score": float(passed),
        "category": category,
        "severity": None,
        "details": {"question": item["question"], "answers": item["answers"]},
    }


def store_finished(
    client: Any, evaluation_id: str, rows: list[dict[str, Any]], **values: Any
) -> None:
    """Insert ``rows`` and set ``values`` (plus ``finished_at``) on the evaluation."""
    with client.app.state.sessionmaker() as session, session.begin():
        session.execute(insert(EvaluationItem), rows)
        session.execute(
            update(Evaluation)
            .where(Evaluation.id == evaluation_id)
            .values(finished_at=utcnow(), **values)
        )
