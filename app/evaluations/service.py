"""Evaluations: create (with the cache), read, list items, cancel. Routes, the UI and workers
all call these; none of them knows HTTP."""

from __future__ import annotations

from typing import Any

from sqlalchemy import case, select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.errors import Problem
from app.core.fingerprint import fingerprint
from app.core.modelcheck import resolve_model
from app.core.pagination import newest_first, page
from app.core.schemas import (
    EvaluationCreate,
    EvaluationPublic,
    ItemPublic,
    ModelPublic,
    Page,
    Progress,
    SuiteRun,
)
from app.core.tables import Evaluation, EvaluationItem, new_id
from app.evaluations import cache
from app.jobs.queue import cancel as cancel_job
from app.suites import versions

# Items per suite are limited to 10,000, so suite index × this + position orders every item of
# an evaluation and fits in one integer cursor.
ORDINAL_STRIDE = 1_000_000


def public(row: Evaluation) -> EvaluationPublic:
    """The API view of an evaluation row."""
    return EvaluationPublic(
        id=row.id,
        status=row.status,
        label=row.label,
        progress=Progress(**row.progress),
        model=ModelPublic(
            path=row.model_path, adapter_path=row.adapter_path, fingerprint=row.model_fingerprint
        ),
        suites=[
            SuiteRun(
                name=s["name"],
                version=s["version"],
                kind=s["kind"],
                content_hash=s["content_hash"],
                item_count=s["items"],
            )
            for s in row.suites
        ],
        prompt_format=row.prompt_format,
        generation=row.generation,
        results=row.results,
        cached_from=row.cached_from,
        attempts=row.attempts,
        error=row.error,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
    )


def get(*, session: Session, evaluation_id: str) -> Evaluation:
    """The evaluation, or a 404 problem."""
    row = session.get(Evaluation, evaluation_id)
    if row is None:
        raise Problem(404, "Evaluation not found", f"evaluation {evaluation_id!r} does not exist")
    return row


def resolve_suites(
    *, session: Session, suites: list[Any], loc: tuple[str, ...] = ("body", "suites")
) -> list[dict[str, Any]]:
    """Suite references and inline suites → the exact versions this run will use.

    ``loc``: where the list sits in the request, for the errors' JSON paths.
    """
    snapshot: list[dict[str, Any]] = []
    for index, entry in enumerate(suites):
        if isinstance(entry, str):
            try:
                row = versions.resolve(session, entry)
            except Problem as exc:
                raise Problem(
                    422,
                    "Unknown suite",
                    exc.detail,
                    errors=[{"loc": [*loc, index], "msg": exc.detail}],
                ) from None
        else:
            try:
                row, _ = versions.register(session, entry, source="inline")
            except Problem as exc:
                if exc.title != "Reserved suite name":
                    raise
                raise Problem(
                    422,
                    exc.title,
                    exc.detail,
                    errors=[{"loc": ["body", "suites", index, "name"], "msg": exc.detail}],
                ) from None
        if any(s["name"] == row.name for s in snapshot):
            raise Problem(422, "Duplicate suite", f"suite {row.name!r} is listed twice")
        snapshot.append(
            {
                "id": row.id,
                "name": row.name,
                "version": row.version,
                "kind": row.kind,
                "content_hash": row.content_hash,
                "items": row.item_count,
            }
        )
    return snapshot


def create(
    *,
    session: Session,
    settings: Settings,
    body: EvaluationCreate,
    finetune_job_id: str | None = None,
) -> Evaluation:
    """Validate and queue an evaluation (caller commits).

    With ``body.cache`` (the default), an evaluation that already succeeded on the same model
    fingerprint, suite contents, prompt format and generation settings answers at once: the
    row is created ``succeeded`` with ``cached_from`` set and its results copied.
    """
    model_dir, adapter_dir = resolve_model(settings, body.model.path, body.model.adapter_path)
    # Hash before touching the database: a first hash of large weights takes seconds, and
    # SQLite refuses a write from a transaction whose snapshot went stale meanwhile.
    try:
        model_fingerprint = fingerprint(model_dir, adapter_dir, cache_dir=settings.cache_dir)
    except OSError as exc:
        raise Problem(
            422, "Unreadable model", f"cannot read {body.model.path!r}: {exc.strerror}"
        ) from None
    snapshot = resolve_suites(session=session, suites=list(body.suites))
    # exclude_none: an unset batch_size leaves the stored settings (and cache keys) as before.
    generation = body.generation.model_dump(exclude_none=True)
    # Resolve the worker's default now (chat iff the tokenizer has a template) so the key is exact.
    prompt_format = cache.effective_prompt_format(body.prompt_format, model_dir)
    key = cache.cache_key(
        fingerprint=model_fingerprint,
        suites=snapshot,
        prompt_format=prompt_format,
        generation=generation,
    )
    row = Evaluation(
        id=new_id("ev"),
        label=body.label,
        model_path=body.model.path,
        adapter_path=body.model.adapter_path,
        model_fingerprint=model_fingerprint,
        prompt_format=prompt_format,
        generation=generation,
        suites=snapshot,
        cache_key=key,
        use_cache=body.cache,
        status="queued",
        progress={"done": 0, "total": sum(s["items"] for s in snapshot), "stage": "queued"},
        max_attempts=settings.max_attempts,
        finetune_job_id=finetune_job_id,
    )
    if body.cache and (source := cache.find_source(session, key)) is not None:
        cache.answer_from(row, source)
    session.add(row)
    return row


def list_page(
    *,
    session: Session,
    limit: int,
    cursor: str | None,
    status: str | None = None,
    model_path: str | None = None,
) -> Page[EvaluationPublic]:
    """Newest first, filtered by ``status`` and ``model_path``."""
    query = select(Evaluation)
    if status:
        query = query.where(Evaluation.status == status)
    if model_path:
        query = query.where(Evaluation.model_path == model_path)
    rows = list(session.execute(newest_first(query, Evaluation, cursor, limit)).scalars())
    rows, next_cursor = page(rows, limit)
    return Page(
        data=[public(r) for r in rows], next_cursor=next_cursor, has_more=next_cursor is not None
    )


def list_items(
    *,
    session: Session,
    evaluation_id: str,
    passed: bool | None = None,
    suite: str | None = None,
    category: str | None = None,
    limit: int = 100,
    cursor: str | None = None,
) -> Page[ItemPublic]:
    """Per-item rows in suite order: the evaluation's suites as listed, each in its items' order,
    whatever order the worker wrote them in (a cached evaluation's items are its source's).

    The cursor is the last row's ordinal, ``suite index × ORDINAL_STRIDE + position``.
    """
    row = get(session=session, evaluation_id=evaluation_id)
    source = row.cached_from or row.id
    suite_index = {s["name"]: n for n, s in enumerate(row.suites)}
    ordinal = (
        case(suite_index, value=EvaluationItem.suite, else_=len(suite_index)) * ORDINAL_STRIDE
        + EvaluationItem.position
        if suite_index
        else EvaluationItem.position
    )
    query = select(EvaluationItem, ordinal).where(EvaluationItem.evaluation_id == source)
    if passed is not None:
        query = query.where(EvaluationItem.passed.is_(passed))
    if suite:
        query = query.where(EvaluationItem.suite == suite)
    if category:
        query = query.where(EvaluationItem.category == category)
    if cursor:
        query = query.where(ordinal > int(cursor))
    found = list(session.execute(query.order_by(ordinal, EvaluationItem.id).limit(limit + 1)))
    has_more = len(found) > limit
    found = found[:limit]
    rows = [item for item, _ in found]
    data = [
        ItemPublic(
            item_id=r.item_id,
            suite=r.suite,
            prompt=r.prompt,
            response=r.response,
            passed=r.passed,
            score=r.score,
            category=r.category,
            severity=r.severity,
            details=r.details,
        )
        for r in rows
    ]
    next_cursor = str(found[-1][1]) if has_more else None
    return Page(data=data, next_cursor=next_cursor, has_more=has_more)


def cancel(*, session: Session, evaluation_id: str) -> EvaluationPublic:
    """Cancel a queued or running evaluation (409 when already finished); commits."""
    # Read, then write: take SQLite's write lock at BEGIN so concurrent cancels wait their turn
    # (a deferred transaction that read before another committed fails "database is locked").
    session.connection(execution_options={"immediate": True})
    row = get(session=session, evaluation_id=evaluation_id)
    if row.status in ("succeeded", "failed"):
        raise Problem(409, "Already finished", f"evaluation {evaluation_id} already {row.status}")
    cancel_job(session, Evaluation, evaluation_id)
    session.commit()
    session.refresh(row)
    return public(row)
