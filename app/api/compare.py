"""``GET /compare``: is the after-run worse than the before-run, and can we defend the answer?"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from app.comparison import service
from app.suites.rules import RULE_QUERY_PARAMETERS, CompareOptions, rules_from_query
from app.web.response_cache import FinishedCache

router = APIRouter(tags=["compare"])


def _compare_json(
    sessions: sessionmaker[Session],
    cache: FinishedCache,
    key: str,
    before: str,
    after: str,
    options: CompareOptions,
) -> bytes:
    with sessions() as session:
        body = service.compare(session=session, before_id=before, after_id=after, options=options)
    # Only succeeded evaluations get this far, and those never change: keep the answer.
    data = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    cache.put(key, data)
    return data


@router.get(
    "/compare",
    response_model=dict[str, Any],
    openapi_extra={"parameters": RULE_QUERY_PARAMETERS},
)
async def compare(
    request: Request,
    before: Annotated[str, Query(min_length=1, max_length=40)],
    after: Annotated[str, Query(min_length=1, max_length=40)],
    suites: Annotated[str | None, Query(max_length=2000)] = None,
    noise_floor: Annotated[str | None, Query(min_length=1, max_length=40)] = None,
    allow_backend_mismatch: bool = False,
) -> Response:
    """The lesson's ``compare_forgetting`` keys, then checklist, flips, statistics, drift, verdict.

    The rules (``threshold``, ``mode``, ``alpha`` …) are the rule book's,
    ``forgetguard.rules.CompareRules``: each parameter says what it does. ``guard`` reports the
    guard's reading of the result (``max_drop``) without changing the verdict.
    ``suites=a,b`` compares only those suites (both runs must have them); ``noise_floor=ID``
    reports the churn between the base and ID, a rerun of it. Runs on different engines
    (backend, dtype, engine version) are a 409 unless ``allow_backend_mismatch=true``, which
    turns the difference into a warning.
    """
    options = CompareOptions.of(
        rules_from_query(request.query_params),
        suites=service.parse_suite_names(suites),
        noise_floor=noise_floor,
        allow_backend_mismatch=allow_backend_mismatch,
    )
    cache: FinishedCache = request.app.state.comparisons
    key = json.dumps([before, after, options.model_dump(mode="json")])
    data = cache.get(key)
    if data is None:
        async with request.app.state.database_slots:  # see app.web.deps.get_session
            data = await run_in_threadpool(
                _compare_json, request.app.state.sessionmaker, cache, key, before, after, options
            )
    return Response(data, media_type="application/json")
