"""``GET /compare``: is the after-run worse than the before-run, and can we defend the answer?"""

from __future__ import annotations

import json
from dataclasses import astuple
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from app.api.evaluations import FinishedCache, get_or_404
from app.compare import CompareOptions, Row, build, comparability_problems
from app.errors import Problem
from app.models import Evaluation, EvaluationItem

router = APIRouter(tags=["compare"])


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


def comparison(
    session: Session, before_id: str, after_id: str, options: CompareOptions
) -> dict[str, Any]:
    """Load, check comparability (409 naming what differs) and compare two evaluations."""
    before, after = get_or_404(session, before_id), get_or_404(session, after_id)
    for row in (before, after):
        if row.status != "succeeded":
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


def _compare_json(
    sessions: sessionmaker[Session],
    cache: FinishedCache,
    key: str,
    before: str,
    after: str,
    options: CompareOptions,
) -> bytes:
    with sessions() as session:
        body = comparison(session, before, after, options)
    # Only succeeded evaluations get this far, and those never change: keep the answer.
    data = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    cache.put(key, data)
    return data


@router.get("/compare", response_model=dict[str, Any])
async def compare(
    request: Request,
    before: Annotated[str, Query(min_length=1, max_length=40)],
    after: Annotated[str, Query(min_length=1, max_length=40)],
    threshold: Annotated[float, Query(ge=0.0, le=1.0)] = 0.10,
    max_category_drop: Annotated[float | None, Query(ge=0.0, le=1.0)] = None,
    max_nll_increase: Annotated[float | None, Query(ge=0.0, le=100.0)] = None,
    mode: Literal["threshold", "noninferiority"] = "threshold",
    alpha: Annotated[float, Query(gt=0.0, lt=0.5)] = 0.05,
) -> Response:
    """The lesson's ``compare_forgetting`` keys, then checklist, flips, statistics, drift, verdict.

    ``mode=noninferiority`` fails unless the upper bound of the (1 - ``alpha``) CI of the drop
    is below ``threshold``; ``max_category_drop`` and ``max_nll_increase`` add stricter rules.
    """
    options = CompareOptions(
        threshold=threshold,
        max_category_drop=max_category_drop,
        max_nll_increase=max_nll_increase,
        mode=mode,
        alpha=alpha,
    )
    cache: FinishedCache = request.app.state.comparisons
    key = json.dumps([before, after, *astuple(options)])
    data = cache.get(key)
    if data is None:
        data = await run_in_threadpool(
            _compare_json, request.app.state.sessionmaker, cache, key, before, after, options
        )
    return Response(data, media_type="application/json")
