"""Run one evaluation job: resume from stored items, score the rest, aggregate the results."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from app.core.config import Settings, normalise_endpoint
from app.core.errors import Problem
from app.core.fingerprint import fingerprint
from app.core.modelcheck import resolve_adapter, resolve_model
from app.core.quantization import adapter_quantization, backend_refusal
from app.core.storable import Unstorable, check_value
from app.core.tables import Evaluation, EvaluationItem, Suite
from app.evaluations import shards
from app.evaluations.cache import (
    cache_key,
    find_source,
    find_suite_source,
    reuse_suite,
    suite_keys,
)
from app.jobs.lifecycle import cached_copy, fail_parent, succeed_sharded
from app.jobs.queue import db_now, guarded_write, succeed, succeed_shard
from app.jobs.status import JobStatus
from app.suites.kinds import KINDS
from app.suites.registry import ItemRow
from workers.context import JobContext
from workers.engine.base import Backend, BadAnswer, UnsupportedRequest
from workers.engine.loading import ModelCache, load_tokenizer
from workers.engine.transformers_backend import TransformersBackend
from workers.engine.vllm_memory import NotEnoughMemory
from workers.evaluation.scoring import RunSettings, run_items
from workers.progress import Phase, Tracker, finished

log = logging.getLogger("forgetguard.worker")


def _done_items(ctx: JobContext, evaluation_id: str) -> set[tuple[str, str]]:
    with ctx.sessionmaker() as session:
        rows = session.execute(
            select(EvaluationItem.suite, EvaluationItem.item_id).where(
                EvaluationItem.evaluation_id == evaluation_id
            )
        )
        return {(r.suite, r.item_id) for r in rows}


def storable_rows(
    rows: list[dict[str, Any]], suite_name: str, max_response_chars: int
) -> list[dict[str, Any]]:
    """Item rows as they may be stored: a response cut to ``max_response_chars`` (the row then
    says ``truncated``; it was scored whole), and nothing the database cannot hold.

    A non-finite number (a served model's NaN log-probability, a local model's overflow) or a
    NUL character anywhere in a row is :class:`BadAnswer` naming the item and field: the
    evaluation fails, and no row of the batch is written.
    """
    kept = []
    for row in rows:
        response = row.get("response")
        cut = isinstance(response, str) and len(response) > max_response_chars
        # Every row names the column: one INSERT takes a batch whose rows have the same keys.
        row = {**row, "truncated": cut}
        if cut:
            row["response"] = str(response)[:max_response_chars]
        try:
            check_value(row, f"item {str(row.get('item_id'))[:200]!r}")
        except Unstorable as exc:
            raise BadAnswer(f"{exc}; nothing of this batch was stored") from None
        kept.append(row)
    return kept


def aggregate(session: Session, evaluation: Evaluation) -> dict[str, Any]:
    """Results per suite, computed from the stored item rows (so counts always match the rows).

    The one place results are computed: at the end of an unsharded run, and when the last
    shard of a sharded one merges (every suite-wide number, from all the rows at once).
    """
    results = {}
    for suite in evaluation.suites:
        rows = session.execute(
            select(EvaluationItem)
            .where(
                EvaluationItem.evaluation_id == evaluation.id,
                EvaluationItem.suite == suite["name"],
            )
            .order_by(EvaluationItem.position)
        ).scalars()
        results[suite["name"]] = KINDS[suite["kind"]].aggregate([ItemRow.of(r) for r in rows])
    return results


@dataclass
class OpenedModel:
    """A backend ready to answer one evaluation, and what the evaluation records about it."""

    backend: Backend
    fingerprint: str
    has_chat_template: bool
    # Beyond EngineInfo: whether the weights were hashed, and what the fingerprint covers.
    weights_hashed: bool = True
    fingerprint_basis: str = "config, tokenizer files and the sha256 of every weight file"
    # Whether the worker already had the base loaded (None: no base here, a served model).
    base_reused: bool | None = None

    def engine(self) -> dict[str, Any]:
        info = {
            **asdict(self.backend.info()),
            "weights_hashed": self.weights_hashed,
            "fingerprint_basis": self.fingerprint_basis,
        }
        if self.base_reused is not None:
            info["base_reused"] = self.base_reused
        return info


Opener = Callable[[JobContext, ModelCache, Evaluation], OpenedModel]


def _open_transformers(ctx: JobContext, models: ModelCache, evaluation: Evaluation) -> OpenedModel:
    loaded = models.get(evaluation.model_path, evaluation.adapter_path)
    return OpenedModel(
        backend=TransformersBackend(
            loaded.model,
            loaded.tokenizer,
            batch_size=evaluation.generation.get("batch_size") or "auto",
        ),
        fingerprint=loaded.fingerprint,
        has_chat_template=bool(getattr(loaded.tokenizer, "chat_template", None)),
        base_reused=loaded.base_reused,
    )


def _open_vllm(ctx: JobContext, models: ModelCache, evaluation: Evaluation) -> OpenedModel:
    try:
        from workers.engine import vllm_backend
    except ImportError as exc:
        raise ctx.user_error(
            f"backend 'vllm' is not installed on this worker ({exc}); see README: vLLM"
        ) from None
    settings = models.settings  # a fine-tune job's also allow its artifacts directory
    budget = settings.read_budget()
    model_dir, adapter_dir = resolve_model(
        settings, evaluation.model_path, evaluation.adapter_path, budget
    )
    # Refused at submission too; checked again here because the folder may have changed since.
    refusal = backend_refusal("vllm", adapter_quantization(adapter_dir, budget))
    if refusal is not None:
        raise ctx.user_error(refusal)
    full = fingerprint(model_dir, adapter_dir, cache_dir=settings.cache_dir, budget=budget)
    base = fingerprint(model_dir, None, cache_dir=settings.cache_dir, budget=budget)
    engines = models.engines.get("vllm")
    if engines is None:
        engines = models.engines["vllm"] = vllm_backend.EngineCache(
            vllm_backend.VLLMSettings(
                tensor_parallel_size=settings.vllm_tensor_parallel_size,
                data_parallel_size=settings.vllm_data_parallel_size,
                gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
                dtype=settings.vllm_dtype,
                max_model_len=settings.vllm_max_model_len,
                max_lora_rank=settings.vllm_max_lora_rank,
            )
        )
    try:
        rank = (
            None
            if adapter_dir is None
            else vllm_backend.check_adapter(adapter_dir, settings.vllm_max_lora_rank)
        )
        if rank is not None:
            # The engine is started once for the largest rank of the adapters queued with
            # this one, so switching to them (LoRARequests) never restarts it.
            for sibling in group_adapter_dirs(ctx, settings, evaluation):
                try:
                    rank = max(
                        rank, vllm_backend.check_adapter(sibling, settings.vllm_max_lora_rank)
                    )
                except vllm_backend.AdapterNotServable:
                    continue  # its own evaluation fails saying why
        started = engines.current
        engine = engines.get(model_dir, base, lambda: load_tokenizer(model_dir), lora_rank=rank)
        backend = vllm_backend.VLLMBackend(engine, adapter_dir)
    except (vllm_backend.AdapterNotServable, NotEnoughMemory) as exc:
        raise ctx.user_error(str(exc)) from None
    return OpenedModel(
        backend=backend,
        fingerprint=full,
        has_chat_template=bool(getattr(engine.tokenizer, "chat_template", None)),
        base_reused=engine is started,
    )


def group_adapter_dirs(ctx: JobContext, settings: Settings, evaluation: Evaluation) -> list[Path]:
    """The adapters of the other unfinished evaluations queued with this one (same base),
    each checked as an ``adapter_path`` is; any that fails the check is left out (its own
    evaluation fails saying why)."""
    if evaluation.group_id is None:
        return []
    with ctx.sessionmaker() as session:
        paths = session.scalars(
            select(Evaluation.adapter_path).where(
                Evaluation.group_id == evaluation.group_id,
                Evaluation.id != evaluation.id,
                Evaluation.model_path == evaluation.model_path,
                Evaluation.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)),
            )
        ).all()
    budget = settings.read_budget()
    found = []
    for path in paths:
        if path is None:
            continue
        try:
            found.append(resolve_adapter(settings, path, budget))
        except Problem:
            continue
    return found


def _open_openai(ctx: JobContext, models: ModelCache, evaluation: Evaluation) -> OpenedModel:
    from workers.engine.openai_backend import (
        FINGERPRINT_BASIS,
        EndpointError,
        OpenAIBackend,
        served_fingerprint,
    )

    endpoint = normalise_endpoint(evaluation.endpoint or "")
    # Checked again here: this worker's allow-list is what lets it make the request.
    if endpoint not in ctx.settings.endpoints:
        raise ctx.user_error(
            f"endpoint {endpoint!r} is not in this worker's FORGETGUARD_ENDPOINTS; "
            "the operator must allow it on the workers too"
        )
    backend = OpenAIBackend(
        endpoint,
        evaluation.model_path,
        timeout=ctx.settings.endpoint_timeout_seconds,
        max_response_bytes=ctx.settings.endpoint_max_response_bytes,
        # Requests in flight are abandoned as soon as the job is cancelled or the worker stops.
        check_stop=ctx.check_stop,
    )
    try:
        fp, _ = served_fingerprint(backend, chat=evaluation.prompt_format == "chat")
    except EndpointError as exc:
        backend.close()
        raise ctx.user_error(str(exc)) from None
    return OpenedModel(
        backend=backend,
        fingerprint=fp,
        # The server applies its own template to chat requests.
        has_chat_template=True,
        weights_hashed=False,
        fingerprint_basis=FINGERPRINT_BASIS,
    )


# Backend name -> how a worker opens it; vLLM and the HTTP client are imported only when used.
BACKENDS: dict[str, Opener] = {
    "transformers": _open_transformers,
    "vllm": _open_vllm,
    "openai": _open_openai,
}


def _answered_from_cache(ctx: JobContext, evaluation: Evaluation) -> dict[str, Any] | None:
    """Finish the claimed evaluation as a copy of an identical run that succeeded meanwhile.

    An evaluation that waited in the queue for an identical running one (the claim lets it
    wait, ``app.jobs.queue``) is answered here, without loading a model: the source's
    results, or None when there is no such run. The key is the one set at submission, as for
    a copy made at submission.
    """
    if not evaluation.use_cache or evaluation.cache_key is None:
        return None
    with guarded_write(ctx.engine, ctx.job, ctx.settings.lease_seconds) as session:
        source = find_source(session, evaluation.cache_key)
        if source is None:
            return None
        copy = cached_copy(source)
        succeed(session, ctx.job, **copy)
    log.info("evaluation %s: answered from identical run %s", evaluation.id, source.id)
    return dict(copy["results"] or {})


def _reuse_suites(
    ctx: JobContext, evaluation_id: str, model_fingerprint: str, snapshot: list[dict[str, Any]]
) -> None:
    """Copy the item rows of each suite not yet begun that an earlier run of this model
    answered with the same content and settings (the per-suite cache, ``app.evaluations.cache``);
    the snapshot names the run each reused suite came from."""
    begun = {suite for suite, _ in _done_items(ctx, evaluation_id)}
    for entry in snapshot:
        if entry["name"] in begun:
            continue
        with guarded_write(ctx.engine, ctx.job, ctx.settings.lease_seconds) as session:
            key = entry["cache_key"]
            source = find_suite_source(
                session, fingerprint=model_fingerprint, key=key, exclude=evaluation_id
            )
            if source is None:
                continue
            copied = reuse_suite(
                session, source_id=source.id, target_id=evaluation_id, suite=entry["name"]
            )
            entry["reused_from"] = source.id
            session.execute(
                update(Evaluation).where(Evaluation.id == evaluation_id).values(suites=snapshot)
            )
        log.info(
            "evaluation %s: suite %s reused from run %s (%d items)",
            evaluation_id,
            entry["name"],
            source.id,
            copied,
        )


def run_evaluation(
    ctx: JobContext,
    models: ModelCache,
    *,
    evaluation_id: str | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Evaluate the claimed job (or ``evaluation_id`` inside a fine-tune job); returns results."""
    evaluation_id = evaluation_id or ctx.job.id
    with ctx.sessionmaker() as session:
        evaluation = session.get(Evaluation, evaluation_id)
        assert evaluation is not None, f"evaluation {evaluation_id} vanished"
        suites = {
            s["name"]: session.get(Suite, s["id"]).definition  # type: ignore[union-attr]
            for s in evaluation.suites
        }

    if evaluation_id == ctx.job.id:
        copied = _answered_from_cache(ctx, evaluation)
        if copied is not None:
            return copied

    ctx.set_stage("loading model")
    opener = BACKENDS.get(evaluation.backend)
    if opener is None:
        raise ctx.user_error(f"unknown backend {evaluation.backend!r}; known: {sorted(BACKENDS)}")
    opened = opener(ctx, models, evaluation)
    has_template = opened.has_chat_template
    prompt_format = evaluation.prompt_format or ("chat" if has_template else "plain")
    if prompt_format == "chat" and not has_template:
        raise ctx.user_error(
            f"prompt_format 'chat' needs a chat template; {evaluation.model_path} has none"
        )
    # The cache key is set from what was actually loaded, so even a run queued with
    # "cache": false (or a model changed since submission) becomes an exact cache source.
    inputs: dict[str, Any] = {
        "fingerprint": opened.fingerprint,
        "suites": evaluation.suites,
        "prompt_format": prompt_format,
        "generation": evaluation.generation,
        "backend": evaluation.backend,
    }
    keys = suite_keys(**inputs)
    snapshot = [{**s, "cache_key": keys[s["name"]]} for s in evaluation.suites]
    # A shard answers part of its evaluation: it has no cache key of its own (it must never
    # be a cache source, nor make an identical run wait); the merge sets the evaluation's.
    shard = evaluation.shard_of is not None
    ctx.update_job(
        evaluation_id,
        model_fingerprint=opened.fingerprint,
        prompt_format=prompt_format,
        cache_key=None if shard else cache_key(**inputs),
        engine=opened.engine(),
        suites=snapshot,
    )
    if evaluation.use_cache:
        _reuse_suites(ctx, evaluation_id, opened.fingerprint, snapshot)
    backend = opened.backend
    settings = RunSettings(
        prompt_format=prompt_format,
        max_new_tokens=int(evaluation.generation.get("max_new_tokens", 50)),
        stop=tuple(evaluation.generation.get("stop", ())),
    )
    # Where the item rows go: the evaluation itself, or for a shard, the evaluation it is a
    # slice of (every shard's rows together are that evaluation's, as if it ran unsharded).
    store_id = evaluation.shard_of or evaluation_id
    done = _done_items(ctx, store_id)
    mine = _slice(evaluation, suites)
    total = len(mine)
    progress = {"done": sum(1 for key in mine if key in done)}
    tracker = Tracker([Phase("items", "items", total, progress["done"])])
    tracker.at("items")  # the clock starts: the items after this are measured
    if on_progress:
        on_progress(progress["done"], total)

    for suite in evaluation.suites:
        definition = suites[suite["name"]]
        pending = [
            (pos, item)
            for pos, item in enumerate(definition["items"])
            if (suite["name"], item["id"]) in mine and (suite["name"], item["id"]) not in done
        ]
        if not pending:
            continue
        ctx.set_stage(f"{suite['name']}", done=progress["done"], total=total)
        log.info(
            "evaluation %s: %s, %d of %d items to do",
            evaluation_id,
            suite["name"],
            len(pending),
            len(definition["items"]),
        )

        def emit(rows: list[dict[str, Any]], suite_name: str = suite["name"]) -> None:
            ctx.check_stop()
            rows = storable_rows(rows, suite_name, ctx.settings.max_stored_response_chars)
            progress["done"] += len(rows)
            now = tracker.at("items", done=progress["done"], stage=suite_name)
            # The lease check and the rows are one transaction: only the holder writes. The
            # evaluation is the claimed job, or one run inside the fine-tune job holding it.
            with guarded_write(ctx.engine, ctx.job, ctx.settings.lease_seconds) as session:
                session.execute(
                    update(Evaluation).where(Evaluation.id == evaluation_id).values(progress=now)
                )
                session.execute(
                    insert(EvaluationItem),
                    [{"evaluation_id": store_id, "suite": suite_name, **row} for row in rows],
                )
            if on_progress:
                on_progress(progress["done"], total)
            ctx.hold_at("items", progress["done"])

        try:
            run_items(suite["kind"], backend, definition, pending, settings, emit)
        except (UnsupportedRequest, BadAnswer) as exc:
            raise ctx.user_error(f"suite {suite['name']!r} (kind {suite['kind']}): {exc}") from None

    if shard:
        return _finish_shard(ctx, finished(total))
    with ctx.sessionmaker() as session:
        evaluation = session.get(Evaluation, evaluation_id)
        assert evaluation is not None
        results = aggregate(session, evaluation)
    try:
        check_value(results, "results")
    except Unstorable as exc:
        raise ctx.user_error(f"the results cannot be stored: {exc}") from None
    if evaluation_id == ctx.job.id:
        with guarded_write(ctx.engine, ctx.job, ctx.settings.lease_seconds) as session:
            succeed(session, ctx.job, results=results, progress=finished(total))
    return results


def _slice(evaluation: Evaluation, suites: dict[str, Any]) -> set[tuple[str, str]]:
    """The (suite, item id) pairs this evaluation scores: all of them, or a shard's slice
    (:func:`app.evaluations.shards.dealt`: whole blocks of the drivers' passes)."""
    items = [suites[suite["name"]]["items"] for suite in evaluation.suites]
    kept: list[Any] = [range(len(found)) for found in items]
    if evaluation.shard_of is not None:
        kept = shards.dealt(evaluation)
    return {
        (suite["name"], found[position]["id"])
        for suite, found, owned in zip(evaluation.suites, items, kept, strict=True)
        for position in owned
    }


def _finish_shard(ctx: JobContext, progress: dict[str, Any]) -> dict[str, Any]:
    """The shard's slice is stored: it succeeds, and if it was the last of its evaluation's
    shards, the evaluation's results are computed here, from all the stored rows, in the
    same transaction (``succeed_shard`` holds the evaluation's row meanwhile). Returns the
    evaluation's results, or {} when other shards are still to finish."""
    with guarded_write(ctx.engine, ctx.job, ctx.settings.lease_seconds) as session:
        parent_id = succeed_shard(session, ctx.job, progress=progress)
        if parent_id is None:
            log.info("evaluation %s: shard done; others still running", ctx.job.id)
            return {}
        results = _merge(session, parent_id)
    return results


def _merge(session: Session, parent_id: str) -> dict[str, Any]:
    """Finish a sharded evaluation whose shards all succeeded: its results from all stored
    rows (``aggregate``, as an unsharded run), and what its shards recorded of the model and
    engine; or fail it when the shards' answers are not one run's. Returns the results."""
    parent = session.get(Evaluation, parent_id)
    assert parent is not None
    now = db_now(session)
    shard_rows = shards.shards_of(session, [parent_id])[parent_id]
    stored = session.execute(
        select(func.count()).where(EvaluationItem.evaluation_id == parent_id)
    ).scalar_one()
    total = int(parent.progress["total"])
    problem = shards.disagreement(shard_rows)
    if problem is None and stored != total:
        problem = f"the shards stored {stored} item rows of {total}"
    results: dict[str, Any] = {}
    if problem is None:
        results = aggregate(session, parent)
        try:
            check_value(results, "results")
        except Unstorable as exc:
            problem = f"the results cannot be stored: {exc}"
    if problem is not None:
        fail_parent(session, parent_id, now=now, error=problem)
        log.warning("evaluation %s: merge failed: %s", parent_id, problem)
        return {}
    engine = {k: v for k, v in (shard_rows[0].engine or {}).items() if k != "base_reused"}
    # Each suite's cache key, as an unsharded run records it (the per-suite cache).
    snapshot = [dict(s) for s in shard_rows[0].suites]
    succeed_sharded(
        session,
        parent_id,
        now=now,
        results=results,
        progress=finished(total),
        model_fingerprint=shard_rows[0].model_fingerprint,
        prompt_format=shard_rows[0].prompt_format,
        engine=engine,
        suites=snapshot,
        cache_key=cache_key(
            fingerprint=str(shard_rows[0].model_fingerprint),
            suites=snapshot,
            prompt_format=str(shard_rows[0].prompt_format),
            generation=parent.generation,
            backend=parent.backend,
        ),
    )
    log.info("evaluation %s: %d shards merged", parent_id, len(shard_rows))
    return results
