"""Fine-tune jobs: validate and queue, read, cancel. Routes, the UI and the demo call these."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.errors import Problem
from app.core.modelcheck import resolve_model, weight_modules
from app.core.pagination import ascending_after, newest_page, trim
from app.core.schemas import Page, Progress
from app.core.tables import FinetuneCheckpoint, FinetuneEvent, FinetuneJob, new_id
from app.evaluations import service as evaluations
from app.finetune.schemas import (
    DOMAIN_DEFAULT_HOLDOUT,
    DOMAIN_DEFAULT_MIN_RECORDS,
    DomainEvaluationSpec,
    FinetuneCheckpointPublic,
    FinetuneEvaluationSpec,
    FinetuneEventPublic,
    FinetuneJobCreate,
    FinetuneJobPublic,
    GeneralData,
    Hyperparameters,
    InterpolationSpec,
    ResolvedHyperparameters,
    ResourcesSpec,
    dataset_changed_detail,
    evaluation_budget_problem,
    holdout_count,
    load_path_records,
    planned_total_steps,
    records_sha256,
    resolve_hyperparameters,
    suite_refs,
    summarize_source,
)
from app.jobs import lifecycle
from app.jobs.queue import begin_write, largest_finetune_worker
from app.jobs.queue import cancel as cancel_job
from app.jobs.status import JobStatus
from app.suites import versions


def hyperparameters(row: FinetuneJob) -> ResolvedHyperparameters:
    """The job's training settings, as resolved when it was queued (jobs queued before they
    were stored are resolved from their request, as then)."""
    if row.resolved is not None:
        return ResolvedHyperparameters.model_validate(row.resolved["hyperparameters"])
    request = row.request
    return resolve_hyperparameters(
        request["method"], request["preset"], Hyperparameters(**request["hyperparameters"])
    )


def planned_steps(row: FinetuneJob) -> int | None:
    """The optimizer steps the dataset planned at submission; the worker learns the exact
    count once its data is prepared (replay records, truncation). None before they were
    stored."""
    return None if row.resolved is None else row.resolved.get("planned_steps")


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
        hyperparameters=hyperparameters(row).model_dump(),
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
        guard=_guard(request),
        shipped_step=(row.metrics or {}).get("shipped", {}).get("step"),
        shipped_reason=(row.metrics or {}).get("shipped", {}).get("reason"),
        interpolation=request.get("interpolation"),
        chosen_alpha=(row.metrics or {}).get("interpolation", {}).get("chosen_alpha"),
        # Jobs stored before the field existed train in one process: the defaults.
        resources=ResourcesSpec.model_validate(request.get("resources") or {}),
        attempts=row.attempts,
        error=row.error,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
    )


def _guard(request: dict[str, Any]) -> dict[str, Any] | None:
    """The guard as given, its ``max_drop`` the one it applies (the rule book's unless given)."""
    guard = request.get("guard")
    if guard is None or guard.get("max_drop") is not None:
        return guard
    return {**guard, "max_drop": request["evaluation"]["max_drop"]}


def get(*, session: Session, job_id: str) -> FinetuneJob:
    """The fine-tune job, or a 404 problem."""
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
    if spec.path is None and spec.source is not None and spec.source != "self":
        try:
            row = versions.resolve(session, spec.source)
        except Problem as exc:
            raise Problem(
                422,
                "Unknown suite",
                exc.detail,
                errors=[{"loc": ["body", where, "source"], "msg": exc.detail}],
            ) from None
        spec.source = f"{row.name}@{row.version}"


def _domain_defaults(session: Session, spec: FinetuneEvaluationSpec, n_records: int) -> None:
    """Hold out part of a large enough dataset by default; check the split; pin domain suites."""
    if spec.domain is None and n_records >= DOMAIN_DEFAULT_MIN_RECORDS:
        spec.domain = DomainEvaluationSpec(holdout=DOMAIN_DEFAULT_HOLDOUT)
    domain = spec.domain
    if not domain:
        return
    if domain.holdout is not None and n_records - holdout_count(n_records, domain.holdout) < 1:
        raise Problem(
            422,
            "Nothing left to train on",
            f"evaluation.domain.holdout {domain.holdout:g} of {n_records} records leaves no "
            "record to train on; lower the fraction or add records",
            errors=[{"loc": ["body", "evaluation", "domain", "holdout"], "msg": "too large"}],
        )
    if domain.suites:
        domain.suites = list(
            suite_refs(evaluations.resolve_suites(session=session, suites=list(domain.suites)))
        )


def _check_processes(session: Session, settings: Settings, processes: int) -> None:
    """Refuse a job no worker could ever take: more processes than the deployment's largest
    worker (``max_processes``) and than any live fine-tune worker holds. A job within either
    waits in the queue for a worker that large (one may not have started yet)."""
    if processes <= settings.max_processes:
        return
    largest = largest_finetune_worker(session, lease_seconds=settings.lease_seconds)
    if processes <= largest:
        return
    raise Problem(
        422,
        "No worker this large",
        f"resources.processes {processes} is more than any worker here can run: the live "
        f"fine-tune workers hold at most {largest} and FORGETGUARD_MAX_PROCESSES is "
        f"{settings.max_processes}; start a worker with --processes {processes} (CPU) or "
        f"--devices (CUDA), or raise FORGETGUARD_MAX_PROCESSES if one will run",
        errors=[{"loc": ["body", "resources", "processes"], "msg": "no worker this large"}],
    )


def _planned_steps(body: FinetuneJobCreate, n_records: int, hp: ResolvedHyperparameters) -> int:
    """The optimizer steps the dataset as inspected plans.

    The examples trained on: the dataset less its held-out split, plus the replay records
    (at most ``int(domain × fraction)``); ``max_steps`` when set fixes the count outright.
    """
    spec = body.evaluation
    domain = n_records
    if spec is not None and spec.domain and spec.domain.holdout is not None:
        domain -= holdout_count(n_records, spec.domain.holdout)
    examples = domain + (int(domain * body.replay.fraction) if body.replay is not None else 0)
    return planned_total_steps(max(1, examples), hp, body.resources.processes)


def _check_evaluation_budget(
    body: FinetuneJobCreate, n_records: int, hp: ResolvedHyperparameters
) -> None:
    """Bound the checkpoint evaluations a cadence derives (422), from the dataset as inspected."""
    spec = body.evaluation
    if spec is None or spec.every_steps is None:
        return
    total = _planned_steps(body, n_records, hp)
    problem = evaluation_budget_problem(
        total, spec.every_steps, spec.checkpoints, exact=hp.max_steps is not None
    )
    if problem is not None:
        raise problem


def _check_target_modules(model_dir: Path, targets: str | list[str]) -> None:
    """Refuse LoRA ``target_modules`` that match no module of the model (422), as peft would,
    but at submission: read from the weights' names, without loading anything."""
    if isinstance(targets, str):  # "all-linear"
        return
    modules = weight_modules(model_dir)
    if not modules:  # names unreadable here; peft will say so in the worker
        return
    missing = [t for t in targets if not any(m == t or m.endswith("." + t) for m in modules)]
    if missing:
        names = sorted(
            {m.rsplit(".", 1)[-1] for m in modules if not m.rsplit(".", 1)[-1].isdigit()}
        )
        detail = (
            f"target_modules {missing} match no module of this model; "
            f"its modules are named {names} (or use 'all-linear')"
        )
        raise Problem(
            422,
            "Unknown target modules",
            detail,
            errors=[{"loc": ["body", "lora", "target_modules"], "msg": detail}],
        )


@dataclass(frozen=True)
class JobFiles:
    """What submission read of the files a job names: the dataset's record count and hash."""

    records: int
    dataset_sha256: str | None = None  # of a dataset file's records (None: inline records)


def inspect_files(
    *, settings: Settings, body: FinetuneJobCreate, allow_from_job: bool = False
) -> JobFiles:
    """Read the client's files a job names (base model, dataset, replay/EWC data files).

    File work only, no database: a route runs it before it takes a database slot, in a pool
    of its own (``app.web.filework``).
    """
    if body.from_job is not None and not allow_from_job:
        raise Problem(
            422,
            "Use the interpolations route",
            "'from_job' is set by POST /finetune-jobs/{id}/interpolations; leave it out",
            errors=[{"loc": ["body", "from_job"], "msg": "not accepted here"}],
        )
    model_dir, _ = resolve_model(settings, body.base_model.path, None)
    if body.lora is not None:
        _check_target_modules(model_dir, body.lora.target_modules)
    dataset_sha256 = None
    if body.dataset.path is not None:
        records = load_path_records(settings, body.dataset.path)
        n_records, dataset_sha256 = len(records), records_sha256(records)
    else:
        n_records = len(body.dataset.examples or [])
    for spec, where in ((body.replay, "replay"), (body.ewc, "ewc")):
        if spec is not None and spec.path is not None:
            load_path_records(settings, spec.path, what=f"{where} data")
    return JobFiles(records=n_records, dataset_sha256=dataset_sha256)


def create(
    *,
    session: Session,
    settings: Settings,
    body: FinetuneJobCreate,
    allow_from_job: bool = False,
    inspected: JobFiles | None = None,
) -> FinetuneJob:
    """Validate all that can be checked without a model; queue the job (caller commits).

    ``inspected``: what :func:`inspect_files` already read (read here when None).
    """
    _check_processes(session, settings, body.resources.processes)
    files = inspected or inspect_files(settings=settings, body=body, allow_from_job=allow_from_job)
    n_records = files.records
    hp = body.resolved()  # once: stored with the job, which trains with these
    if body.evaluation is not None:
        # Pin suite versions (inline suites are registered): before and after run the same ones.
        body.evaluation.suites = list(
            suite_refs(
                evaluations.resolve_suites(
                    session=session,
                    suites=list(body.evaluation.suites),
                    loc=("body", "evaluation", "suites"),
                    benchmarks_dir=settings.benchmarks_dir,
                )
            )
        )
        _domain_defaults(session, body.evaluation, n_records)
        _check_evaluation_budget(body, n_records, hp)
    _pin_general_source(session, settings, body.replay, "replay")
    _pin_general_source(session, settings, body.ewc, "ewc")
    warnings = body.warnings(n_records)
    row = FinetuneJob(
        id=new_id("ft"),
        label=body.label,
        base_model_path=body.base_model.path,
        backend=body.evaluation.backend if body.evaluation is not None else "transformers",
        request=body.model_dump(mode="json"),
        progress={"done": 0, "total": 0, "stage": "queued"},
        max_attempts=settings.max_attempts,
        warnings=warnings,
        processes=body.resources.processes,
        resolved={
            "hyperparameters": hp.model_dump(mode="json"),
            "planned_steps": _planned_steps(body, n_records, hp),
        },
    )
    lifecycle.submit(session, row)
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


def cancel(*, session: Session, job_id: str) -> FinetuneJobPublic:
    """Cancel a queued or running job and its own evaluations (409 when finished); commits."""
    begin_write(session)
    row = get(session=session, job_id=job_id)
    if row.status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        raise Problem(409, "Already finished", f"fine-tune job {job_id} already {row.status}")
    was = row.status
    cancel_job(session, FinetuneJob, job_id)  # its before/after evaluations stop with it
    if was != JobStatus.CANCELLED:
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


def list_page(
    *, session: Session, limit: int, cursor: str | None, status: str | None = None
) -> Page[FinetuneJobPublic]:
    """Newest first, filtered by ``status``."""
    query = select(FinetuneJob)
    if status:
        query = query.where(FinetuneJob.status == status)
    return newest_page(session, query, FinetuneJob, cursor, limit, public)


def list_events(
    *,
    session: Session,
    job_id: str,
    limit: int = 100,
    cursor: str | None = None,
    level: str | None = None,
) -> Page[FinetuneEventPublic]:
    """Oldest first: stages, steps, checkpoints, warnings."""
    get(session=session, job_id=job_id)
    query = select(FinetuneEvent).where(FinetuneEvent.job_id == job_id)
    if level:
        query = query.where(FinetuneEvent.level == level)
    query = ascending_after(query, FinetuneEvent.id, cursor, limit)
    rows, has_more = trim(list(session.execute(query).scalars()), limit)
    data = [
        FinetuneEventPublic(
            id=str(r.id), created_at=r.created_at, level=r.level, message=r.message, data=r.data
        )
        for r in rows
    ]
    return Page(data=data, next_cursor=str(rows[-1].id) if has_more else None, has_more=has_more)


def _checkpoint_public(row: FinetuneCheckpoint) -> FinetuneCheckpointPublic:
    return FinetuneCheckpointPublic(
        step=row.step,
        general=row.general,
        domain=row.domain,
        drift=row.drift,
        verdict=row.verdict,
        created_at=row.created_at,
    )


def checkpoints(*, session: Session, job_id: str) -> list[FinetuneCheckpointPublic]:
    """All the job's checkpoint evaluations by step (step 0 is the base); 404 for no such job."""
    get(session=session, job_id=job_id)
    rows = session.scalars(
        select(FinetuneCheckpoint)
        .where(FinetuneCheckpoint.job_id == job_id)
        .order_by(FinetuneCheckpoint.step)
    )
    return [_checkpoint_public(r) for r in rows]


def checkpoints_page(
    *, session: Session, job_id: str, limit: int = 100, cursor: str | None = None
) -> Page[FinetuneCheckpointPublic]:
    """One page of the job's checkpoint evaluations by step, after the step ``cursor``."""
    get(session=session, job_id=job_id)
    query = select(FinetuneCheckpoint).where(FinetuneCheckpoint.job_id == job_id)
    query = ascending_after(query, FinetuneCheckpoint.step, cursor, limit)
    rows, has_more = trim(list(session.execute(query).scalars()), limit)
    return Page(
        data=[_checkpoint_public(r) for r in rows],
        next_cursor=str(rows[-1].step) if has_more else None,
        has_more=has_more,
    )


def interpolate(
    *, session: Session, settings: Settings, job_id: str, body: InterpolationSpec
) -> FinetuneJob:
    """Queue an interpolation sweep of a finished job's fine-tune (no training; caller commits)."""
    parent = get(session=session, job_id=job_id)
    if parent.status != "succeeded" or parent.output_path is None:
        raise Problem(
            409,
            "Fine-tune not finished",
            f"fine-tune job {job_id} is {parent.status}; interpolate a succeeded job",
        )
    request = dict(parent.request)
    if request.get("evaluation") is None:
        raise Problem(
            409,
            "Nothing to choose by",
            f"fine-tune job {job_id} ran without evaluation; an interpolation is chosen by it",
        )
    source = parent.request.get("from_job") or parent.id
    evaluation = {**request["evaluation"], "every_steps": None, "checkpoints": None}
    request.update(
        interpolation=body.model_dump(mode="json"),
        from_job=source,
        guard=None,
        evaluation=evaluation,
        label=f"{parent.label or parent.id}: interpolation"[:200],
    )
    sweep = FinetuneJobCreate.model_validate(request)
    files = inspect_files(settings=settings, body=sweep, allow_from_job=True)
    # The split belongs to the trained job: a dataset file that changed since would put
    # records it trained on among the sweep's held-out ones.
    trained = session.get(FinetuneJob, source)
    recorded = ((trained.metrics or {}).get("dataset") or {}).get("sha256") if trained else None
    if recorded and files.dataset_sha256 and files.dataset_sha256 != recorded:
        detail = dataset_changed_detail(source, sweep.dataset.path)
        raise Problem(
            409,
            "Dataset changed",
            detail,
            errors=[{"loc": ["body", "dataset", "path"], "msg": detail}],
        )
    return create(
        session=session,
        settings=settings,
        body=sweep,
        allow_from_job=True,
        inspected=files,
    )
