"""``/evaluations``: queue a model evaluation, watch it, read its items, cancel it."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from sqlalchemy.orm import Session

from app import cache
from app.api.deps import SessionDep, SettingsDep
from app.api.pagination import Cursor, Limit, StatusFilter, newest_first, page
from app.config import Settings
from app.errors import Problem
from app.fingerprint import fingerprint
from app.idempotency import REPLAY_HEADER, IdempotencyDep
from app.modelcheck import resolve_model
from app.models import FINISHED, Evaluation, EvaluationItem, new_id
from app.queue import cancel
from app.schemas import (
    EvaluationCreate,
    EvaluationPublic,
    ItemPublic,
    ModelPublic,
    Page,
    Progress,
    SuiteRun,
)
from app.suites import registry

router = APIRouter(prefix="/evaluations", tags=["evaluations"])


class FinishedCache:
    """A small LRU of serialized bodies about finished evaluations (those never change).

    Bounded by entry count and by total bytes: comparison bodies can weigh megabytes.
    """

    def __init__(self, size: int = 2048, max_bytes: int = 64 << 20) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self._bytes = 0
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: str, value: bytes) -> None:
        if len(value) > self.max_bytes // 4:
            return  # one huge body must not flush everything else
        with self._lock:
            if (old := self._items.pop(key, None)) is not None:
                self._bytes -= len(old)
            self._items[key] = value
            self._bytes += len(value)
            while len(self._items) > self.size or self._bytes > self.max_bytes:
                self._bytes -= len(self._items.popitem(last=False)[1])


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
            SuiteRun(**{k: s[k] for k in ("name", "version", "kind", "content_hash", "items")})
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


def get_or_404(session: Session, evaluation_id: str) -> Evaluation:
    row = session.get(Evaluation, evaluation_id)
    if row is None:
        raise Problem(404, "Evaluation not found", f"evaluation {evaluation_id!r} does not exist")
    return row


def resolve_suites(session: Session, suites: list[Any]) -> list[dict[str, Any]]:
    """Suite references and inline suites → the exact versions this run will use."""
    snapshot: list[dict[str, Any]] = []
    for index, entry in enumerate(suites):
        if isinstance(entry, str):
            try:
                row = registry.resolve(session, entry)
            except Problem as exc:
                raise Problem(
                    422,
                    "Unknown suite",
                    exc.detail,
                    errors=[{"loc": ["body", "suites", index], "msg": exc.detail}],
                ) from None
        else:
            row, _ = registry.register(session, entry, source="inline")
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


def create_evaluation(
    session: Session,
    settings: Settings,
    body: EvaluationCreate,
    *,
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
    snapshot = resolve_suites(session, list(body.suites))
    generation = body.generation.model_dump()
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


@router.post("", status_code=202, response_model=EvaluationPublic)
def post_evaluation(
    body: EvaluationCreate,
    session: SessionDep,
    settings: SettingsDep,
    response: Response,
    idem: IdempotencyDep,
) -> EvaluationPublic:
    """Queue an evaluation; 202 with ``Location: /evaluations/{id}``.

    A cache hit answers with an evaluation already ``succeeded`` (``cached_from`` set). A
    repeated ``Idempotency-Key`` with the same body answers 200 with the original evaluation.
    """
    evaluation_id, created = idem.create_once(
        session, lambda: create_evaluation(session, settings, body).id
    )
    if not created:
        response.status_code = 200
        response.headers[REPLAY_HEADER] = "true"
    response.headers["Location"] = f"/evaluations/{evaluation_id}"
    return public(get_or_404(session, evaluation_id))


@router.get("", response_model=Page[EvaluationPublic])
def list_evaluations(
    session: SessionDep,
    limit: Limit = 50,
    cursor: Cursor = None,
    status: StatusFilter = None,
    model_path: Annotated[str | None, Query(max_length=4096)] = None,
) -> Page[EvaluationPublic]:
    """Newest first; filter by ``status`` and ``model_path``."""
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


@router.get("/{evaluation_id}", response_model=EvaluationPublic)
async def get_evaluation(evaluation_id: str, request: Request) -> Response:
    """Status, progress and results."""
    # A finished evaluation never changes again, so its serialized body is kept per process and
    # served straight from the event loop: CI pipelines poll this route, often many at once.
    finished: FinishedCache = request.app.state.finished_evaluations
    body = finished.get(evaluation_id)
    if body is None:
        body = await run_in_threadpool(
            _load_public, request.app.state.sessionmaker, finished, evaluation_id
        )
    return Response(body, media_type="application/json")


def _load_public(sessionmaker: Any, finished: FinishedCache, evaluation_id: str) -> bytes:
    with sessionmaker() as session:
        row = get_or_404(session, evaluation_id)
        body = public(row).model_dump_json().encode()
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
    cursor: Annotated[str | None, Query(max_length=40, pattern="^[0-9]+$")] = None,
) -> Page[ItemPublic]:
    """Per-item prompt, response and score; filter ``passed=false`` to see what went wrong."""
    row = get_or_404(session, evaluation_id)
    # A cached evaluation's items are its source's.
    source = row.cached_from or row.id
    query = select(EvaluationItem).where(EvaluationItem.evaluation_id == source)
    if passed is not None:
        query = query.where(EvaluationItem.passed.is_(passed))
    if suite:
        query = query.where(EvaluationItem.suite == suite)
    if category:
        query = query.where(EvaluationItem.category == category)
    if cursor:
        query = query.where(EvaluationItem.id > int(cursor))
    rows = list(session.execute(query.order_by(EvaluationItem.id).limit(limit + 1)).scalars())
    has_more = len(rows) > limit
    rows = rows[:limit]
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
    return Page(data=data, next_cursor=str(rows[-1].id) if has_more else None, has_more=has_more)


@router.post("/{evaluation_id}/cancel", response_model=EvaluationPublic)
def cancel_evaluation(evaluation_id: str, session: SessionDep) -> EvaluationPublic:
    """Cancel a queued or running evaluation (a running one stops within one batch)."""
    row = get_or_404(session, evaluation_id)
    if row.status in ("succeeded", "failed"):
        raise Problem(409, "Already finished", f"evaluation {evaluation_id} already {row.status}")
    cancel(session, Evaluation, evaluation_id)
    session.commit()
    session.refresh(row)
    return public(row)
