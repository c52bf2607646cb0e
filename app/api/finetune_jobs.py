"""``/finetune-jobs``: queue a fine-tune job, watch it and its events, cancel it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.api.deps import SessionDep, SettingsDep
from app.api.evaluations import resolve_suites
from app.api.pagination import Cursor, Limit, StatusFilter, newest_first, page
from app.config import Settings
from app.errors import Problem
from app.finetune import (
    FinetuneEventPublic,
    FinetuneJobCreate,
    FinetuneJobPublic,
    GeneralData,
    Hyperparameters,
    load_path_records,
    resolve_hyperparameters,
    suite_refs,
    summarize_source,
)
from app.idempotency import REPLAY_HEADER, IdempotencyDep
from app.modelcheck import resolve_model
from app.models import Evaluation, FinetuneEvent, FinetuneJob, new_id, utcnow
from app.queue import cancel
from app.schemas import Page, Progress
from app.suites import registry

router = APIRouter(prefix="/finetune-jobs", tags=["finetune-jobs"])


def public(row: FinetuneJob) -> FinetuneJobPublic:
    """The API view of a fine-tune job (inline records are counted, not echoed)."""
    request = row.request
    return FinetuneJobPublic(
        id=row.id,
        status=row.status,
        label=row.label,
        progress=Progress(**row.progress),
        base_model={"path": row.base_model_path},
        method=request["method"],
        preset=request["preset"],
        hyperparameters=resolve_hyperparameters(
            request["method"], request["preset"], Hyperparameters(**request["hyperparameters"])
        ).model_dump(),
        lora=request.get("lora"),
        replay=summarize_source(request.get("replay")),
        ewc=summarize_source(request.get("ewc")),
        dataset=summarize_source(request["dataset"]) or {},
        evaluation=request.get("evaluation"),
        before_evaluation_id=row.before_evaluation_id,
        after_evaluation_id=row.after_evaluation_id,
        comparison=row.comparison,
        output_path=row.output_path,
        warnings=list(row.warnings or []),
        trainable_parameters=row.trainable_parameters,
        metrics=row.metrics,
        attempts=row.attempts,
        error=row.error,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
    )


def get_or_404(session: Session, job_id: str) -> FinetuneJob:
    row = session.get(FinetuneJob, job_id)
    if row is None:
        raise Problem(404, "Fine-tune job not found", f"fine-tune job {job_id!r} does not exist")
    return row


def _pin_general_source(
    session: Session, settings: Settings, spec: GeneralData | None, where: str
) -> None:
    """Check a replay/EWC source now and pin a suite source to its current version."""
    if spec is None:
        return
    if spec.path is not None:
        load_path_records(settings, spec.path, what=f"{where} data")
    elif spec.source is not None and spec.source != "self":
        try:
            row = registry.resolve(session, spec.source)
        except Problem as exc:
            raise Problem(
                422,
                "Unknown suite",
                exc.detail,
                errors=[{"loc": ["body", where, "source"], "msg": exc.detail}],
            ) from None
        spec.source = f"{row.name}@{row.version}"


def create_finetune_job(
    session: Session, settings: Settings, body: FinetuneJobCreate
) -> FinetuneJob:
    """Validate all that can be checked without a model; queue the job (caller commits)."""
    resolve_model(settings, body.base_model.path, None)
    if body.dataset.path is not None:
        n_records = len(load_path_records(settings, body.dataset.path))
    else:
        n_records = len(body.dataset.examples or [])
    if body.evaluation is not None:
        # Pin suite versions (inline suites are registered): before and after run the same ones.
        body.evaluation.suites = list(
            suite_refs(resolve_suites(session, list(body.evaluation.suites)))
        )
    _pin_general_source(session, settings, body.replay, "replay")
    _pin_general_source(session, settings, body.ewc, "ewc")
    warnings = body.warnings(n_records)
    hp = body.resolved()
    row = FinetuneJob(
        id=new_id("ft"),
        label=body.label,
        base_model_path=body.base_model.path,
        request=body.model_dump(mode="json"),
        status="queued",
        progress={"done": 0, "total": 0, "stage": "queued"},
        max_attempts=settings.max_attempts,
        warnings=warnings,
    )
    session.add(row)
    session.flush()
    session.add(
        FinetuneEvent(
            job_id=row.id,
            level="info",
            message="queued",
            data={
                "method": body.method,
                "preset": body.preset,
                "records": n_records,
                "hyperparameters": hp.model_dump(),
            },
        )
    )
    for warning in warnings:
        session.add(FinetuneEvent(job_id=row.id, level="warning", message=warning, data=None))
    return row


@router.post("", status_code=202, response_model=FinetuneJobPublic)
def post_finetune_job(
    body: FinetuneJobCreate,
    session: SessionDep,
    settings: SettingsDep,
    response: Response,
    idem: IdempotencyDep,
) -> FinetuneJobPublic:
    """Queue a fine-tune job; 202 with ``Location: /finetune-jobs/{id}``."""
    job_id, created = idem.create_once(
        session, lambda: create_finetune_job(session, settings, body).id
    )
    if not created:
        response.status_code = 200
        response.headers[REPLAY_HEADER] = "true"
    response.headers["Location"] = f"/finetune-jobs/{job_id}"
    return public(get_or_404(session, job_id))


@router.get("", response_model=Page[FinetuneJobPublic])
def list_finetune_jobs(
    session: SessionDep,
    limit: Limit = 50,
    cursor: Cursor = None,
    status: StatusFilter = None,
) -> Page[FinetuneJobPublic]:
    """Newest first; filter by ``status``."""
    query = select(FinetuneJob)
    if status:
        query = query.where(FinetuneJob.status == status)
    rows = list(session.execute(newest_first(query, FinetuneJob, cursor, limit)).scalars())
    rows, next_cursor = page(rows, limit)
    return Page(
        data=[public(r) for r in rows], next_cursor=next_cursor, has_more=next_cursor is not None
    )


@router.get("/{job_id}", response_model=FinetuneJobPublic)
def get_finetune_job(job_id: str, session: SessionDep) -> FinetuneJobPublic:
    """Status, progress, warnings, and once finished the comparison, artifact and metrics."""
    return public(get_or_404(session, job_id))


@router.get("/{job_id}/events", response_model=Page[FinetuneEventPublic])
def list_events(
    job_id: str,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: Annotated[str | None, Query(max_length=40, pattern="^[0-9]+$")] = None,
    level: Annotated[str | None, Query(pattern="^(debug|info|warning|error)$")] = None,
) -> Page[FinetuneEventPublic]:
    """Oldest first: stages, steps (loss, learning rate, epoch), checkpoints, warnings."""
    get_or_404(session, job_id)
    query = select(FinetuneEvent).where(FinetuneEvent.job_id == job_id)
    if level:
        query = query.where(FinetuneEvent.level == level)
    if cursor:
        query = query.where(FinetuneEvent.id > int(cursor))
    rows = list(session.execute(query.order_by(FinetuneEvent.id).limit(limit + 1)).scalars())
    has_more = len(rows) > limit
    rows = rows[:limit]
    data = [
        FinetuneEventPublic(
            id=str(r.id), created_at=r.created_at, level=r.level, message=r.message, data=r.data
        )
        for r in rows
    ]
    return Page(data=data, next_cursor=str(rows[-1].id) if has_more else None, has_more=has_more)


@router.post("/{job_id}/cancel", response_model=FinetuneJobPublic)
def cancel_finetune_job(job_id: str, session: SessionDep) -> FinetuneJobPublic:
    """Cancel a queued or running job (a running one stops within one optimizer step)."""
    row = get_or_404(session, job_id)
    if row.status in ("succeeded", "failed"):
        raise Problem(409, "Already finished", f"fine-tune job {job_id} already {row.status}")
    was = row.status
    cancel(session, FinetuneJob, job_id)
    # Its before/after evaluations belong to it: they stop with it.
    session.execute(
        update(Evaluation)
        .where(Evaluation.finetune_job_id == job_id, Evaluation.status.in_(("queued", "running")))
        .values(status="cancelled", finished_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if was != "cancelled":
        session.add(
            FinetuneEvent(
                job_id=job_id,
                level="info",
                message="cancelled by request",
                data={"status_before": was},
            )
        )
    session.commit()
    session.refresh(row)
    return public(row)
