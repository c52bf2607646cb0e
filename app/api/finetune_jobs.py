"""``/finetune-jobs``: queue a fine-tune job, watch it and its events, cancel it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.pagination import Cursor, Limit, SeqCursor, StatusFilter
from app.core.schemas import Page
from app.finetune import service
from app.finetune.schemas import (
    FinetuneCheckpointPublic,
    FinetuneEventPublic,
    FinetuneJobCreate,
    FinetuneJobPublic,
    InterpolationSpec,
)
from app.web.deps import SessionDep, SettingsDep, database_session
from app.web.filework import run_file_work
from app.web.idempotency import Idempotency, IdempotencyDep, answer

router = APIRouter(prefix="/finetune-jobs", tags=["finetune-jobs"])


@router.post("", status_code=202, response_model=FinetuneJobPublic)
async def post_finetune_job(
    body: FinetuneJobCreate,
    request: Request,
    settings: SettingsDep,
    response: Response,
    idem: IdempotencyDep,
) -> FinetuneJobPublic:
    """Queue a fine-tune job; 202 with ``Location: /finetune-jobs/{id}``."""
    replay = None
    if idem.key is not None:
        async with database_session(request) as session:
            replay = await run_in_threadpool(idem.existing, session)
    # The model folder and data files are read before a database slot is taken.
    inspected = (
        None
        if replay is not None
        else await run_file_work(request, service.inspect_files, settings=settings, body=body)
    )
    async with database_session(request) as session:
        return await run_in_threadpool(_submit, session, settings, body, inspected, response, idem)


def _submit(
    session: Session,
    settings: Settings,
    body: FinetuneJobCreate,
    inspected: service.JobFiles | None,
    response: Response,
    idem: Idempotency,
) -> FinetuneJobPublic:
    job_id, created = idem.create_once(
        session,
        lambda: (
            service.create(session=session, settings=settings, body=body, inspected=inspected).id
        ),
    )
    answer(response, created=created, location=f"/finetune-jobs/{job_id}")
    return service.public(service.get(session=session, job_id=job_id))


@router.get("", response_model=Page[FinetuneJobPublic])
def list_finetune_jobs(
    session: SessionDep,
    limit: Limit = 50,
    cursor: Cursor = None,
    status: StatusFilter = None,
) -> Page[FinetuneJobPublic]:
    """Newest first; filter by ``status``."""
    return service.list_page(session=session, limit=limit, cursor=cursor, status=status)


@router.get("/{job_id}", response_model=FinetuneJobPublic)
def get_finetune_job(job_id: str, session: SessionDep) -> FinetuneJobPublic:
    """Status, progress, warnings, and once finished the comparison, artifact and metrics."""
    return service.public(service.get(session=session, job_id=job_id))


@router.get("/{job_id}/events", response_model=Page[FinetuneEventPublic])
def list_events(
    job_id: str,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: SeqCursor = None,
    level: Annotated[str | None, Query(pattern="^(debug|info|warning|error)$")] = None,
) -> Page[FinetuneEventPublic]:
    """Oldest first: stages, steps (loss, learning rate, epoch), checkpoints, warnings."""
    return service.list_events(
        session=session, job_id=job_id, limit=limit, cursor=cursor, level=level
    )


@router.get("/{job_id}/checkpoints", response_model=Page[FinetuneCheckpointPublic])
def list_checkpoints(
    job_id: str,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: SeqCursor = None,
) -> Page[FinetuneCheckpointPublic]:
    """Evaluations during training, by step (0: the base): the forgetting and learning curves."""
    return service.checkpoints_page(session=session, job_id=job_id, limit=limit, cursor=cursor)


@router.post("/{job_id}/interpolations", status_code=202, response_model=FinetuneJobPublic)
def post_interpolation(
    job_id: str,
    body: InterpolationSpec,
    session: SessionDep,
    settings: SettingsDep,
    response: Response,
    idem: IdempotencyDep,
) -> FinetuneJobPublic:
    """Sweep α between the base and this job's fine-tune (no training): a new job, 202."""
    new_id, created = idem.create_once(
        session,
        lambda: (
            service.interpolate(session=session, settings=settings, job_id=job_id, body=body).id
        ),
    )
    answer(response, created=created, location=f"/finetune-jobs/{new_id}")
    return service.public(service.get(session=session, job_id=new_id))


@router.post("/{job_id}/cancel", response_model=FinetuneJobPublic)
def cancel_finetune_job(job_id: str, session: SessionDep) -> FinetuneJobPublic:
    """Cancel a queued or running job (a running one stops within one optimizer step)."""
    return service.cancel(session=session, job_id=job_id)
