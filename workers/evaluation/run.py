"""Run one evaluation job: resume from stored items, score the rest, aggregate the results."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import insert, select, update

from app.core.database import immediate_session
from app.core.tables import Evaluation, EvaluationItem, Suite
from app.evaluations.cache import cache_key
from app.jobs.queue import renew, succeed
from app.suites.kinds import KINDS, ItemRow
from workers.context import JobContext
from workers.engine.loading import ModelCache
from workers.engine.transformers_backend import TransformersBackend
from workers.evaluation.runners import RunSettings, run_items

log = logging.getLogger("forgetguard.worker")


def _done_items(ctx: JobContext, evaluation_id: str) -> set[tuple[str, str]]:
    with ctx.sessionmaker() as session:
        rows = session.execute(
            select(EvaluationItem.suite, EvaluationItem.item_id).where(
                EvaluationItem.evaluation_id == evaluation_id
            )
        )
        return {(r.suite, r.item_id) for r in rows}


def aggregate(ctx: JobContext, evaluation: Evaluation) -> dict[str, Any]:
    """Results per suite, computed from the stored item rows (so counts always match the rows)."""
    results = {}
    with ctx.sessionmaker() as session:
        for suite in evaluation.suites:
            rows = session.execute(
                select(EvaluationItem)
                .where(
                    EvaluationItem.evaluation_id == evaluation.id,
                    EvaluationItem.suite == suite["name"],
                )
                .order_by(EvaluationItem.position)
            ).scalars()
            results[suite["name"]] = KINDS[suite["kind"]].aggregate(
                [
                    ItemRow(
                        item_id=r.item_id,
                        passed=r.passed,
                        score=r.score,
                        category=r.category,
                        severity=r.severity,
                        response=r.response,
                        details=r.details,
                    )
                    for r in rows
                ]
            )
    return results


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

    ctx.set_stage("loading model")
    loaded = models.get(evaluation.model_path, evaluation.adapter_path)
    has_template = bool(getattr(loaded.tokenizer, "chat_template", None))
    prompt_format = evaluation.prompt_format or ("chat" if has_template else "plain")
    if prompt_format == "chat" and not has_template:
        raise ctx.user_error(
            f"prompt_format 'chat' needs a chat template; {evaluation.model_path} has none"
        )
    # The cache key is set from what was actually loaded, so even a run queued with
    # "cache": false (or a model changed since submission) becomes an exact cache source.
    key = cache_key(
        fingerprint=loaded.fingerprint,
        suites=evaluation.suites,
        prompt_format=prompt_format,
        generation=evaluation.generation,
    )
    ctx.update_job(
        evaluation_id,
        model_fingerprint=loaded.fingerprint,
        prompt_format=prompt_format,
        cache_key=key,
    )

    backend = TransformersBackend(
        loaded.model, loaded.tokenizer, batch_size=evaluation.generation.get("batch_size") or "auto"
    )
    settings = RunSettings(
        prompt_format=prompt_format,
        max_new_tokens=int(evaluation.generation.get("max_new_tokens", 50)),
        stop=tuple(evaluation.generation.get("stop", ())),
    )
    done = _done_items(ctx, evaluation_id)
    total = sum(len(defn["items"]) for defn in suites.values())
    progress = {"done": len(done)}

    for suite in evaluation.suites:
        definition = suites[suite["name"]]
        pending = [
            (pos, item)
            for pos, item in enumerate(definition["items"])
            if (suite["name"], item["id"]) not in done
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
            progress["done"] += len(rows)
            with immediate_session(ctx.engine) as session, session.begin():
                # The lease check and the rows are one transaction: only the holder writes.
                now = {"done": progress["done"], "total": total, "stage": suite_name}
                if evaluation_id == ctx.job.id:
                    renew(session, ctx.job, ctx.settings.lease_seconds, progress=now)
                else:  # an evaluation run inside a fine-tune job: the job holds the lease
                    renew(session, ctx.job, ctx.settings.lease_seconds)
                    session.execute(
                        update(Evaluation)
                        .where(Evaluation.id == evaluation_id)
                        .values(progress=now)
                    )
                session.execute(
                    insert(EvaluationItem),
                    [{"evaluation_id": evaluation_id, "suite": suite_name, **row} for row in rows],
                )
            if on_progress:
                on_progress(progress["done"], total)

        run_items(suite["kind"], backend, definition, pending, settings, emit)

    with ctx.sessionmaker() as session:
        evaluation = session.get(Evaluation, evaluation_id)
        assert evaluation is not None
    results = aggregate(ctx, evaluation)
    if evaluation_id == ctx.job.id:
        with immediate_session(ctx.engine) as session, session.begin():
            succeed(
                session,
                ctx.job,
                results=results,
                progress={"done": total, "total": total, "stage": "done"},
            )
    return results
