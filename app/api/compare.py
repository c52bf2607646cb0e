"""``GET /compare``: is the after-run worse than the before-run, and can we defend the answer?"""

from __future__ import annotations

import json
from dataclasses import astuple
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from app.comparison import service
from app.comparison.verdict import CompareOptions
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


@router.get("/compare", response_model=dict[str, Any])
async def compare(
    request: Request,
    before: Annotated[str, Query(min_length=1, max_length=40)],
    after: Annotated[str, Query(min_length=1, max_length=40)],
    threshold: Annotated[float, Query(ge=0.0, le=1.0)] = 0.10,
    max_category_drop: Annotated[float | None, Query(ge=0.0, le=1.0)] = None,
    max_nll_increase: Annotated[float | None, Query(ge=0.0, le=100.0)] = None,
    max_kl: Annotated[float | None, Query(ge=0.0, le=100.0)] = None,
    mode: Literal["threshold", "noninferiority"] = "threshold",
    alpha: Annotated[float, Query(gt=0.0, lt=0.5)] = 0.05,
    category_rule: Literal["point", "significant"] = "point",
    suites: Annotated[str | None, Query(max_length=2000)] = None,
    noise_floor: Annotated[str | None, Query(min_length=1, max_length=40)] = None,
    allow_backend_mismatch: bool = False,
) -> Response:
    """The lesson's ``compare_forgetting`` keys, then checklist, flips, statistics, drift, verdict.

    ``mode=noninferiority`` fails unless the upper bound of the (1 - ``alpha``) CI of the drop
    is below ``threshold``; ``max_category_drop``, ``max_nll_increase`` and ``max_kl`` (mean
    KL(base ‖ candidate) in nats per token on perplexity suites) add stricter rules;
    ``category_rule=significant`` fails a category only when its Holm-adjusted p is below
    ``alpha``. ``suites=a,b`` compares only those suites (both runs must have them);
    ``noise_floor=ID`` reports the churn between the base and ID, a rerun of it.
    Runs on different engines (backend, dtype, engine version) are a 409 unless
    ``allow_backend_mismatch=true``, which turns the difference into a warning.
    """
    options = CompareOptions(
        threshold=threshold,
        max_category_drop=max_category_drop,
        max_nll_increase=max_nll_increase,
        max_kl=max_kl,
        mode=mode,
        alpha=alpha,
        category_rule=category_rule,
        suites=service.parse_suite_names(suites),
        noise_floor=noise_floor,
        allow_backend_mismatch=allow_backend_mismatch,
    )
    cache: FinishedCache = request.app.state.comparisons
    key = json.dumps([before, after, *astuple(options)])
    data = cache.get(key)
    if data is None:
        async with request.app.state.database_slots:  # see app.web.deps.get_session
            data = await run_in_threadpool(
                _compare_json, request.app.state.sessionmaker, cache, key, before, after, options
            )
    return Response(data, media_type="application/json")
