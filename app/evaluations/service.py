"""Evaluations: create (with the cache), read, list items, cancel. Routes, the UI and workers
all call these; none of them knows HTTP."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import case, select
from sqlalchemy.orm import Session

from app.core.clientfiles import ReadBudget
from app.core.config import Settings, normalise_endpoint
from app.core.errors import Problem
from app.core.fingerprint import fingerprint
from app.core.modelcheck import resolve_adapter, resolve_model
from app.core.pagination import ascending_after, newest_first, page, trim
from app.core.quantization import adapter_quantization, backend_refusal
from app.core.schemas import (
    EnginePublic,
    EvaluationCreate,
    EvaluationGroupPublic,
    EvaluationPublic,
    ItemPublic,
    ModelPublic,
    Page,
    Progress,
    SuiteRun,
)
from app.core.tables import Evaluation, EvaluationItem, new_id
from app.evaluations import cache, shards
from app.jobs import lifecycle
from app.jobs.queue import begin_write
from app.jobs.queue import cancel as cancel_job
from app.jobs.status import JobStatus
from app.suites import references, versions
from forgetguard.suites import expand

# Items per suite are limited to 10,000, so suite index × this + position orders every item of
# an evaluation and fits in one integer cursor.
ORDINAL_STRIDE = 1_000_000


def public(row: Evaluation, shard_rows: Sequence[Evaluation] | None = None) -> EvaluationPublic:
    """The API view of an evaluation row; a sharded one's needs its ``shard_rows``
    (:func:`view` reads them)."""
    sharded = row.shard_count is not None and row.shard_of is None
    return EvaluationPublic(
        id=row.id,
        status=row.status,
        label=row.label,
        progress=Progress(**shards.progress(row, shard_rows or [])),
        model=ModelPublic(
            path=row.model_path,
            adapter_path=row.adapter_path,
            fingerprint=row.model_fingerprint,
            backend=row.backend,
            endpoint=row.endpoint,
            engine=EnginePublic(**row.engine) if row.engine else None,
        ),
        suites=[
            SuiteRun(
                name=s["name"],
                version=s["version"],
                kind=s["kind"],
                content_hash=s["content_hash"],
                item_count=s["items"],
                reused_from=s.get("reused_from"),
            )
            for s in row.suites
        ],
        prompt_format=row.prompt_format,
        generation=row.generation,
        results=row.results,
        cached_from=row.cached_from,
        attempts=row.attempts,
        error=row.error,
        group=row.group_id,
        shards=shards.summary(shard_rows or []) if sharded else None,
        shard_of=row.shard_of,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
    )


def view(*, session: Session, row: Evaluation) -> EvaluationPublic:
    """:func:`public`, with a sharded evaluation's shards read from the database."""
    if row.shard_count is None or row.shard_of is not None:
        return public(row)
    return public(row, shards.shards_of(session, [row.id])[row.id])


def views(*, session: Session, rows: Sequence[Evaluation]) -> list[EvaluationPublic]:
    """:func:`view` of many rows, the shards of all of them read in one query."""
    found = shards.shards_of(
        session, [r.id for r in rows if r.shard_count is not None and r.shard_of is None]
    )
    return [public(r, found.get(r.id)) for r in rows]


def get(*, session: Session, evaluation_id: str) -> Evaluation:
    """The evaluation, or a 404 problem."""
    row = session.get(Evaluation, evaluation_id)
    if row is None:
        raise Problem(404, "Evaluation not found", f"evaluation {evaluation_id!r} does not exist")
    return row


def get_group(
    *, session: Session, group_id: str, adapters: Sequence[str] = ()
) -> EvaluationGroupPublic:
    """The evaluations one request queued together (404 when none), in the order of
    ``adapters`` (the request's list) where given, else in the order they were queued."""
    rows = list(
        session.scalars(
            select(Evaluation)
            .where(Evaluation.group_id == group_id)
            .order_by(Evaluation.created_at, Evaluation.id)
        )
    )
    if not rows:
        raise Problem(404, "Evaluation group not found", f"group {group_id!r} does not exist")
    order = {path: n for n, path in enumerate(adapters)}
    rows.sort(key=lambda r: order.get(r.adapter_path or "", len(order)))
    return EvaluationGroupPublic(group=group_id, data=views(session=session, rows=rows))


def resolve_suites(
    *,
    session: Session,
    suites: list[Any],
    loc: tuple[str, ...] = ("body", "suites"),
    benchmarks_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """Suite references (``app.suites.references``: versions, options, groups, pulled
    benchmarks from ``benchmarks_dir``) and inline suites → the exact versions this run uses.

    ``loc``: where the list sits in the request, for the errors' JSON paths.
    """
    rows = []
    for index, entry in enumerate(suites):
        if isinstance(entry, str):
            for ref in expand(entry):
                try:
                    rows.append(references.resolve(session, ref, benchmarks_dir=benchmarks_dir))
                except Problem as exc:
                    raise Problem(
                        422,
                        exc.title if exc.status == 422 else "Unknown suite",
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
            rows.append(row)
    snapshot: list[dict[str, Any]] = []
    for row in rows:
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


@dataclass(frozen=True)
class LocalModel:
    """What submission learns from a local model's folder: its fingerprint and the prompt
    format the worker will use."""

    fingerprint: str
    prompt_format: str


def inspect_model(*, settings: Settings, body: EvaluationCreate) -> LocalModel | None:
    """Read the client's model folder for a submission (None for a served model).

    All of it is file work on the client's files, bounded by one read budget
    (``FORGETGUARD_CLIENT_READ_SECONDS``), and none of it touches the database, so a route
    runs it before it takes a database slot (see ``app.web.filework``).
    """
    if body.model.backend == "openai":
        return None
    assert body.model.path is not None  # the schema requires it for local backends
    assert body.model.adapters is None, "one evaluation per adapter: inspect_adapters"
    budget = settings.read_budget()
    model_dir, adapter_dir = resolve_model(
        settings, body.model.path, body.model.adapter_path, budget
    )
    return LocalModel(
        fingerprint=_fingerprint(settings, body, model_dir, adapter_dir, budget),
        # The worker's default now (chat iff the tokenizer has a template), so the key is exact.
        prompt_format=cache.effective_prompt_format(body.prompt_format, model_dir, budget),
    )


def inspect_adapters(*, settings: Settings, body: EvaluationCreate) -> list[LocalModel]:
    """:func:`inspect_model` for each adapter of ``body.model.adapters``, in order.

    The base is checked once, then each adapter as an ``adapter_path`` is (roots: 403;
    loadability: 422, its ``errors`` naming the adapter's place in the list), all within one
    read budget: the whole request is one read of the client's files.
    """
    assert body.model.path is not None and body.model.adapters is not None
    budget = settings.read_budget()
    model_dir, _ = resolve_model(settings, body.model.path, None, budget)
    prompt_format = cache.effective_prompt_format(body.prompt_format, model_dir, budget)
    found = []
    for index, adapter in enumerate(body.model.adapters):
        try:
            adapter_dir = resolve_adapter(settings, adapter, budget)
            model_fingerprint = _fingerprint(settings, body, model_dir, adapter_dir, budget)
        except Problem as exc:
            raise Problem(
                exc.status,
                exc.title,
                exc.detail,
                errors=[{"loc": ["body", "model", "adapters", index], "msg": exc.detail}],
                headers=exc.headers,
                **exc.extra,
            ) from None
        found.append(LocalModel(fingerprint=model_fingerprint, prompt_format=prompt_format))
    return found


def _fingerprint(
    settings: Settings,
    body: EvaluationCreate,
    model_dir: Path,
    adapter_dir: Path | None,
    budget: ReadBudget,
) -> str:
    """The fingerprint of the base + adapter, once the backend is known to load the adapter
    (a QLoRA adapter's NF4 base: not on vLLM)."""
    refusal = backend_refusal(body.model.backend, adapter_quantization(adapter_dir, budget))
    if refusal is not None:
        raise Problem(
            422,
            "Backend cannot load this adapter",
            refusal,
            errors=[{"loc": ["body", "model", "backend"], "msg": refusal}],
        )
    shown = body.model.path
    # Hashed before touching the database: a first hash of large weights takes seconds, and
    # SQLite refuses a write from a transaction whose snapshot went stale meanwhile.
    try:
        return fingerprint(model_dir, adapter_dir, cache_dir=settings.cache_dir, budget=budget)
    except OSError as exc:
        raise Problem(422, "Unreadable model", f"cannot read {shown!r}: {exc.strerror}") from None


def create(
    *,
    session: Session,
    settings: Settings,
    body: EvaluationCreate,
    finetune_job_id: str | None = None,
    inspected: LocalModel | None = None,
) -> Evaluation:
    """Validate and queue an evaluation (caller commits).

    With ``body.cache`` (the default), an evaluation that already succeeded on the same model
    fingerprint, backend, suite contents, prompt format and generation settings answers at
    once: the row is created ``succeeded`` with ``cached_from`` set and its results copied.
    A served model (backend ``openai``) is fingerprinted by the worker, which asks the server,
    so it is never answered from the cache at submission. ``inspected``: what
    :func:`inspect_model` already read of the model folder (read here when None).
    """
    if body.model.backend == "openai":
        return _create_served(
            session=session, settings=settings, body=body, finetune_job_id=finetune_job_id
        )
    local = inspected or inspect_model(settings=settings, body=body)
    assert local is not None  # a local backend's model folder was read
    snapshot = resolve_suites(
        session=session, suites=list(body.suites), benchmarks_dir=settings.benchmarks_dir
    )
    return _create_local(
        session=session,
        settings=settings,
        body=body,
        local=local,
        snapshot=snapshot,
        finetune_job_id=finetune_job_id,
    )


def create_group(
    *,
    session: Session,
    settings: Settings,
    body: EvaluationCreate,
    inspected: list[LocalModel] | None = None,
) -> str:
    """Queue one evaluation per adapter of ``body.model.adapters`` (caller commits); returns
    the id of their group.

    Each is an ordinary evaluation of the base with that adapter (its own fingerprint, cache
    answer, items and comparison); they share the suite versions resolved once here, and are
    queued together, so a worker takes them one after another with the base loaded once.
    ``inspected``: what :func:`inspect_adapters` already read (read here when None).
    """
    found = inspected or inspect_adapters(settings=settings, body=body)
    snapshot = resolve_suites(
        session=session, suites=list(body.suites), benchmarks_dir=settings.benchmarks_dir
    )
    group_id = new_id("eg")
    for one, local in zip(body.one_per_adapter(), found, strict=True):
        _create_local(
            session=session,
            settings=settings,
            body=one,
            local=local,
            snapshot=[dict(s) for s in snapshot],
            group_id=group_id,
        )
    return group_id


def _create_local(
    *,
    session: Session,
    settings: Settings,
    body: EvaluationCreate,
    local: LocalModel,
    snapshot: list[dict[str, Any]],
    finetune_job_id: str | None = None,
    group_id: str | None = None,
) -> Evaluation:
    """Queue (or answer from the cache) one evaluation of a local model already inspected."""
    assert body.model.adapters is None, "one evaluation per adapter: create_group"
    # exclude_none: an unset batch_size leaves the stored settings (and cache keys) as before.
    generation = body.generation.model_dump(exclude_none=True)
    prompt_format = local.prompt_format
    model_fingerprint = local.fingerprint
    key = cache.cache_key(
        fingerprint=model_fingerprint,
        suites=snapshot,
        prompt_format=prompt_format,
        generation=generation,
        backend=body.model.backend,
    )
    row = Evaluation(
        id=new_id("ev"),
        label=body.label,
        model_path=body.model.path,
        adapter_path=body.model.adapter_path,
        backend=body.model.backend,
        model_fingerprint=model_fingerprint,
        prompt_format=prompt_format,
        generation=generation,
        suites=snapshot,
        cache_key=key,
        use_cache=body.cache,
        progress={"done": 0, "total": sum(s["items"] for s in snapshot), "stage": "queued"},
        max_attempts=settings.max_attempts,
        finetune_job_id=finetune_job_id,
        group_id=group_id,
    )
    source = cache.find_source(session, key) if body.cache else None
    _submit_sharded(session, row, body.shards, cached=source)
    return row


def _submit_sharded(
    session: Session, row: Evaluation, count: int, *, cached: Evaluation | None
) -> None:
    """Queue ``row`` (or answer it from ``cached``); with ``count`` > 1 and no cache answer,
    as a sharded evaluation: ``count`` shard jobs are queued in its place."""
    most = shards.max_shards([int(suite["items"]) for suite in row.suites])
    if count > 1 and count > most:
        raise Problem(
            422,
            "More shards than blocks of items",
            f"shards={count}, but this evaluation's items make {most} blocks of up to "
            f"{shards.BLOCK} (a shard scores whole blocks, so that its batches are an "
            f"unsharded run's); use at most {most}",
            errors=[{"loc": ["body", "shards"], "msg": f"at most {most}"}],
        )
    if count > 1 and cached is None:
        row.shard_count = count
        for shard in shards.new_shards(row, count):
            lifecycle.submit(session, shard)
    lifecycle.submit(session, row, cached=cached)


def allowed_endpoint(settings: Settings, endpoint: str) -> str:
    """The endpoint as listed in ``FORGETGUARD_ENDPOINTS``, or a 403 problem (no SSRF)."""
    wanted = normalise_endpoint(endpoint)
    if wanted not in settings.endpoints:
        raise Problem(
            403,
            "Endpoint not allowed",
            f"endpoint {endpoint!r} is not on this server's allow-list; an operator must add "
            "it to FORGETGUARD_ENDPOINTS (comma-separated base URLs) before evaluations may "
            "use it",
        )
    return wanted


# Suite kinds whose scores need log-probabilities of given text, which an OpenAI-compatible
# server only returns for plain completions (``echo`` + ``logprobs``), never for chat.
_LOGPROB_KINDS = ("multiple_choice",)


def _create_served(
    *,
    session: Session,
    settings: Settings,
    body: EvaluationCreate,
    finetune_job_id: str | None,
) -> Evaluation:
    """Queue an evaluation of a model served at an allow-listed OpenAI-compatible endpoint."""
    assert body.model.endpoint is not None and body.model.model is not None
    endpoint = allowed_endpoint(settings, body.model.endpoint)
    snapshot = resolve_suites(
        session=session, suites=list(body.suites), benchmarks_dir=settings.benchmarks_dir
    )
    # No tokenizer here to look for a chat template: a served model is asked in chat format
    # unless the client says plain (servers apply their own template to chat requests).
    prompt_format = body.prompt_format or "chat"
    if prompt_format == "chat":
        for suite in snapshot:
            if suite["kind"] in _LOGPROB_KINDS:
                raise Problem(
                    422,
                    "Suite needs log-probabilities",
                    f"suite {suite['name']!r} (kind {suite['kind']}) is scored from "
                    "log-probabilities, which an OpenAI-compatible server returns only for "
                    'plain completions; use "prompt_format": "plain" for this suite',
                    errors=[{"loc": ["body", "prompt_format"], "msg": "chat"}],
                )
    row = Evaluation(
        id=new_id("ev"),
        label=body.label,
        model_path=body.model.model,
        adapter_path=None,
        backend="openai",
        endpoint=endpoint,
        model_fingerprint=None,
        prompt_format=prompt_format,
        generation=body.generation.model_dump(),
        suites=snapshot,
        cache_key=None,
        use_cache=body.cache,
        progress={"done": 0, "total": sum(s["items"] for s in snapshot), "stage": "queued"},
        max_attempts=settings.max_attempts,
        finetune_job_id=finetune_job_id,
    )
    _submit_sharded(session, row, body.shards, cached=None)
    return row


def list_page(
    *,
    session: Session,
    limit: int,
    cursor: str | None,
    status: str | None = None,
    model_path: str | None = None,
    group: str | None = None,
) -> Page[EvaluationPublic]:
    """Newest first, filtered by ``status``, ``model_path`` and ``group``; shard jobs are
    shown inside their evaluation, not listed."""
    query = select(Evaluation).where(Evaluation.shard_of.is_(None))
    if status:
        query = query.where(Evaluation.status == status)
    if model_path:
        query = query.where(Evaluation.model_path == model_path)
    if group:
        query = query.where(Evaluation.group_id == group)
    rows = list(session.execute(newest_first(query, Evaluation, cursor, limit)).scalars())
    rows, next_cursor = page(rows, limit)
    return Page(
        data=views(session=session, rows=rows),
        next_cursor=next_cursor,
        has_more=next_cursor is not None,
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

    The cursor is the last row's ordinal, ``suite index × ORDINAL_STRIDE + position``. A shard
    lists its slice of its evaluation's rows.
    """
    row = get(session=session, evaluation_id=evaluation_id)
    source = row.shard_of or row.cached_from or row.id
    suite_index = {s["name"]: n for n, s in enumerate(row.suites)}
    ordinal = (
        case(suite_index, value=EvaluationItem.suite, else_=len(suite_index)) * ORDINAL_STRIDE
        + EvaluationItem.position
        if suite_index
        else EvaluationItem.position
    )
    query = select(EvaluationItem, ordinal).where(EvaluationItem.evaluation_id == source)
    if row.shard_of is not None:
        query = query.where(shards.slice_rows(row))
    if passed is not None:
        query = query.where(EvaluationItem.passed.is_(passed))
    if suite:
        query = query.where(EvaluationItem.suite == suite)
    if category:
        query = query.where(EvaluationItem.category == category)
    query = ascending_after(query, ordinal, cursor, limit, EvaluationItem.id)
    found, has_more = trim(list(session.execute(query)), limit)
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
            truncated=r.truncated,
        )
        for r in rows
    ]
    next_cursor = str(found[-1][1]) if has_more else None
    return Page(data=data, next_cursor=next_cursor, has_more=has_more)


def cancel(*, session: Session, evaluation_id: str) -> EvaluationPublic:
    """Cancel a queued or running evaluation (409 when already finished); commits."""
    begin_write(session)
    row = get(session=session, evaluation_id=evaluation_id)
    if row.status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        raise Problem(409, "Already finished", f"evaluation {evaluation_id} already {row.status}")
    if row.shard_of is not None:
        raise Problem(
            409,
            "A shard is cancelled with its evaluation",
            f"evaluation {evaluation_id} is shard {row.shard_index} of {row.shard_of}; "
            f"cancel {row.shard_of}, which cancels all its shards",
        )
    cancel_job(session, Evaluation, evaluation_id)
    session.commit()
    session.refresh(row)
    return view(session=session, row=row)
