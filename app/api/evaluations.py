"""``/evaluations``: queue a model evaluation, watch it, read its items, cancel it."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.pagination import Cursor, Limit, SeqCursor, StatusFilter
from app.core.schemas import (
    EvaluationCreate,
    EvaluationGroupPublic,
    EvaluationPublic,
    ItemPublic,
    Page,
)
from app.evaluations import service
from app.jobs.status import FINISHED
from app.web.deps import SessionDep, SettingsDep, database_session
from app.web.filework import run_file_work
from app.web.idempotency import Idempotency, IdempotencyDep, answer
from app.web.response_cache import FinishedCache

router = APIRouter(prefix="/evaluations", tags=["evaluations"])


@router.post(
    "",
    status_code=202,
    response_model=EvaluationPublic | EvaluationGroupPublic,
    responses={
        202: {
            "description": "queued: the evaluation, or with `model.adapters` the group of "
            "evaluations, one per adapter",
        },
        200: {
            "model": EvaluationPublic | EvaluationGroupPublic,
            "description": "answered from the cache (cached_from set; with `model.adapters`: "
            "every adapter's), or an idempotent replay",
        },
    },
)
async def post_evaluation(
    body: EvaluationCreate,
    request: Request,
    settings: SettingsDep,
    response: Response,
    idem: IdempotencyDep,
) -> EvaluationPublic | EvaluationGroupPublic:
    """Queue an evaluation; 202 with ``Location: /evaluations/{id}``.

    A cache hit is a finished resource, not accepted work: 200 with the evaluation already
    ``succeeded`` and ``cached_from`` set. A repeated ``Idempotency-Key`` with the same body
    answers 200 with the original evaluation. With ``model.adapters``: one evaluation per
    adapter of the base, answered as their group (``Location: /evaluations?group={id}``).
    """
    replay = None
    if idem.key is not None:
        async with database_session(request) as session:
            replay = await run_in_threadpool(idem.existing, session)
    # The model folder is read before a database slot is taken, in a pool of its own.
    if body.model.adapters is not None:
        found = (
            None
            if replay is not None
            else await run_file_work(
                request, service.inspect_adapters, settings=settings, body=body
            )
        )
        async with database_session(request) as session:
            return await run_in_threadpool(
                _submit_group, session, settings, body, found, response, idem
            )
    inspected = (
        None
        if replay is not None
        else await run_file_work(request, service.inspect_model, settings=settings, body=body)
    )
    async with database_session(request) as session:
        return await run_in_threadpool(_submit, session, settings, body, inspected, response, idem)


def _submit(
    session: Session,
    settings: Settings,
    body: EvaluationCreate,
    inspected: service.LocalModel | None,
    response: Response,
    idem: Idempotency,
) -> EvaluationPublic:
    evaluation_id, created = idem.create_once(
        session,
        lambda: (
            service.create(session=session, settings=settings, body=body, inspected=inspected).id
        ),
    )
    answer(response, created=created, location=f"/evaluations/{evaluation_id}")
    evaluation = service.view(
        session=session, row=service.get(session=session, evaluation_id=evaluation_id)
    )
    if evaluation.cached_from is not None:
        response.status_code = 200
    return evaluation


def _submit_group(
    session: Session,
    settings: Settings,
    body: EvaluationCreate,
    inspected: list[service.LocalModel] | None,
    response: Response,
    idem: Idempotency,
) -> EvaluationGroupPublic:
    group_id, created = idem.create_once(
        session,
        lambda: service.create_group(
            session=session, settings=settings, body=body, inspected=inspected
        ),
    )
    answer(response, created=created, location=f"/evaluations?group={group_id}")
    group = service.get_group(
        session=session, group_id=group_id, adapters=body.model.adapters or ()
    )
    if all(evaluation.cached_from is not None for evaluation in group.data):
        response.status_code = 200
    return group


@router.get("", response_model=Page[EvaluationPublic])
def list_evaluations(
    session: SessionDep,
    limit: Limit = 50,
    cursor: Cursor = None,
    status: StatusFilter = None,
    model_path: Annotated[str | None, Query(max_length=4096)] = None,
    group: Annotated[str | None, Query(max_length=40)] = None,
) -> Page[EvaluationPublic]:
    """Newest first; filter by ``status``, ``model_path`` and ``group`` (the evaluations one
    request with ``model.adapters`` queued)."""
    return service.list_page(
        session=session,
        limit=limit,
        cursor=cursor,
        status=status,
        model_path=model_path,
        group=group,
    )


@router.get("/{evaluation_id}", response_model=EvaluationPublic)
async def get_evaluation(evaluation_id: str, request: Request) -> Response:
    """Status, progress and results."""
    # A finished evaluation never changes again, so its serialized body is kept per process and
    # served straight from the event loop: CI pipelines poll this route, often many at once.
    finished: FinishedCache = request.app.state.finished_evaluations
    body = finished.get(evaluation_id)
    if body is None:
        async with request.app.state.database_slots:  # see app.web.deps.get_session
            body = await run_in_threadpool(
                _load_public, request.app.state.sessionmaker, finished, evaluation_id
            )
    return Response(body, media_type="application/json")


def _load_public(sessionmaker: Any, finished: FinishedCache, evaluation_id: str) -> bytes:
    with sessionmaker() as session:
        row = service.get(session=session, evaluation_id=evaluation_id)
        body = service.view(session=session, row=row).model_dump_json().encode()
    if row.status in FINISHED:
        finished.put(evaluation_id, body)
    return body


@router.get("/{evaluation_id}/items", response_model=Page[ItemPublic])
def list_items(
    evaluation_id: str,
    session: SessionDep,
    passed: bool | None = None,
    suite: Annotated[str | None, Query(max_length=100)] = None,
    category: Annotated[str | None, Query(max_length=100)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: SeqCursor = None,
) -> Page[ItemPublic]:
    """Per-item prompt, response and score; filter ``passed=false`` to see what went wrong."""
    return service.list_items(
        session=session,
        evaluation_id=evaluation_id,
        passed=passed,
        suite=suite,
        category=category,
        limit=limit,
        cursor=cursor,
    )


@router.post("/{evaluation_id}/cancel", response_model=EvaluationPublic)
def cancel_evaluation(evaluation_id: str, session: SessionDep) -> EvaluationPublic:
    """Cancel a queued or running evaluation (a running one stops within one batch)."""
    return service.cancel(session=session, evaluation_id=evaluation_id)
