"""The before and after evaluations of a fine-tune job and their comparison."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from sqlalchemy import insert, select

from app.comparison import service as comparison
from app.core.config import Settings
from app.core.fingerprint import fingerprint
from app.core.schemas import EvaluationCreate, ModelRef
from app.core.tables import Evaluation, EvaluationItem, FinetuneEvent
from app.evaluations import service as evaluations
from app.jobs import lifecycle
from app.jobs.queue import guarded_write, set_job
from app.jobs.status import JobStatus
from app.suites import versions
from workers.context import JobContext, UserError
from workers.engine.loading import ModelCache, resolve_model
from workers.evaluation.run import run_evaluation, storable_rows
from workers.finetune.artifacts import FINAL_ANSWERS, TrainingOutcome
from workers.finetune.statefile import read_state
from workers.progress import finished

if TYPE_CHECKING:
    from workers.finetune.stages.context import StageRun


@dataclass
class StageContext(JobContext):
    """A JobContext for an evaluation the job runs: its stages are the job's phase ``phase``
    ("before evaluation: general-qa"), and its progress the job's."""

    phase: str = ""
    run: StageRun | None = None

    def set_stage(self, stage: str, *, done: int | None = None, total: int | None = None) -> None:
        assert self.run is not None
        self.run.progress(
            self.phase,
            done=done,
            total=total,
            stage=f"{self.phase}: {stage}",
            store="now",
            measured=False,
        )


def in_phase(run: StageRun, phase: str) -> StageContext:
    """The job's context, for an evaluation that is the job's phase ``phase``."""
    ctx = run.ctx
    return StageContext(
        **{f.name: getattr(ctx, f.name) for f in fields(JobContext)}, phase=phase, run=run
    )


def job_settings(settings: Settings) -> Settings:
    """Settings for evaluations a job creates: the artifacts dir is an allowed model root.

    Only the worker uses these: clients still cannot name paths under the artifacts dir, and
    a job only ever points its own after-evaluation at its own output.
    """
    roots = [*settings.model_roots, settings.artifacts_dir]
    return type(settings)(**{**settings.model_dump(), "model_roots": roots})


def evaluation_definitions(run: StageRun) -> list[dict[str, Any]]:
    spec = run.request.evaluation
    if spec is None:
        return []
    with run.ctx.sessionmaker() as session:
        out = []
        for ref in spec.suites:
            assert isinstance(ref, str), "suites are pinned to name@version at submission"
            out.append(versions.resolve(session, ref).definition)
        return out


def evaluate(
    run: StageRun,
    which: str,
    model_path: str,
    adapter_path: str | None,
    *,
    suites: list[str] | None = None,
    answers: dict[str, Any] | None = None,
) -> str:
    """Create (or find) one of the job's evaluations, run it to the end; returns its id.

    ``before`` and ``after`` run the general suites and are the job's own columns; any other
    ``which`` (e.g. ``domain before``) runs ``suites`` and is found again by its label.
    ``answers``: the last checkpoint evaluation's (:func:`final_answers`), taken as the item
    rows of the suites it answered.
    """
    column = f"{which}_evaluation_id" if which in ("before", "after") else None
    spec = run.request.evaluation
    assert spec is not None
    label = f"{run.request.label or run.job_id}: {which}"
    evaluation_id: str | None = (
        getattr(run.job(), column) if column is not None else _child(run, label)
    )
    settings = job_settings(run.settings)
    from_base = adapter_path is None and which.endswith("before")
    if evaluation_id is None:
        # Fingerprint before the write transaction: hashing weights takes seconds, and
        # SQLite's write lock must not be held meanwhile (the hash is cached on disk).
        model_dir, adapter_dir = resolve_model(settings, model_path, adapter_path)
        fingerprint(model_dir, adapter_dir, cache_dir=settings.cache_dir)
        body = EvaluationCreate(
            model=ModelRef(path=model_path, adapter_path=adapter_path, backend=spec.backend),
            suites=list(spec.suites) if suites is None else list(suites),
            prompt_format=spec.prompt_format,
            generation=spec.generation,
            label=label,
            cache=spec.cache if from_base else False,
        )
        with guarded_write(run.ctx.engine, run.ctx.job, run.settings.lease_seconds) as session:
            row = evaluations.create(
                session=session, settings=settings, body=body, finetune_job_id=run.job_id
            )
            # Never visible as queued: a worker would claim it as a job of its own.
            lifecycle.start_child(row)
            session.flush()
            evaluation_id = row.id
            cached = row.cached_from
            if column is not None:
                set_job(session, run.ctx.job, **{column: evaluation_id})
            session.add(
                FinetuneEvent(
                    job_id=run.job_id,
                    level="info",
                    message=f"{which} evaluation {evaluation_id}"
                    + (f" answered from cache ({cached})" if cached else ""),
                    data={
                        "evaluation_id": evaluation_id,
                        "which": which,
                        "cached_from": cached,
                    },
                )
            )
    with run.ctx.sessionmaker() as session:
        current = session.get(Evaluation, evaluation_id)
        assert current is not None
        status, snapshot = current.status, current.suites
    if status == JobStatus.SUCCEEDED:  # an earlier attempt's, or answered from the cache
        run.tracker.skip(f"{which} evaluation")
        return evaluation_id
    if status != JobStatus.RUNNING:
        raise UserError(
            f"the {which} evaluation {evaluation_id} is {status}; nothing to compare without it"
        )
    if answers is not None:
        _take_answers(run, which, evaluation_id, snapshot, answers)
    phase = f"{which} evaluation"
    run.stage(phase, total=sum(s["items"] for s in snapshot), data={"evaluation_id": evaluation_id})
    models = run.models if from_base else ModelCache(settings, run.device)
    # One vLLM engine per worker: the after-evaluation's adapter is served on the base's.
    models.engines = run.models.engines
    begun = False

    def on_progress(done: int, total: int) -> None:
        nonlocal begun  # the first report counts what was done before (resumed, taken)
        run.progress(phase, done=done, total=total, measured=begun)
        begun = True

    results = run_evaluation(
        in_phase(run, phase), models, evaluation_id=evaluation_id, on_progress=on_progress
    )
    with guarded_write(run.ctx.engine, run.ctx.job, run.settings.lease_seconds) as session:
        total = sum(s["items"] for s in snapshot)
        ended = lifecycle.succeed_child(
            session, evaluation_id, results=results, progress=finished(total)
        )
    if not ended:
        raise UserError(
            f"the {which} evaluation {evaluation_id} was cancelled; nothing to compare to"
        )
    run.event(
        f"{which} evaluation finished",
        data={"evaluation_id": evaluation_id, "results": headline(results)},
    )
    return evaluation_id


def final_answers(run: StageRun, outcome: TrainingOutcome) -> dict[str, Any] | None:
    """The last checkpoint evaluation's answers, when the after-evaluation measures the same
    weights: those of the step training ended at, not an earlier step the guard shipped."""
    saved = read_state(run.job_dir / FINAL_ANSWERS)
    if saved is None or saved.get("step") != outcome.metrics.get("global_step"):
        return None
    shipped = outcome.metrics.get("shipped") or {}
    if shipped.get("step") not in (None, saved["step"]):
        return None
    return saved


def _take_answers(
    run: StageRun,
    which: str,
    evaluation_id: str,
    snapshot: list[dict[str, Any]],
    answers: dict[str, Any],
) -> None:
    """Store ``answers`` as the item rows of each suite of the evaluation not yet begun: the
    final checkpoint evaluation and the after-evaluation of the same weights are one run."""
    limit = run.settings.max_stored_response_chars
    with guarded_write(run.ctx.engine, run.ctx.job, run.settings.lease_seconds) as session:
        begun = set(
            session.scalars(
                select(EvaluationItem.suite)
                .where(EvaluationItem.evaluation_id == evaluation_id)
                .distinct()
            )
        )
        taken = []
        for suite in snapshot:
            rows = answers["suites"].get(suite["name"])
            if rows is None or suite["name"] in begun or len(rows) != suite["items"]:
                continue
            session.execute(
                insert(EvaluationItem),
                [
                    {"evaluation_id": evaluation_id, "suite": suite["name"], **row}
                    for row in storable_rows(rows, suite["name"], limit)
                ],
            )
            taken.append(suite["name"])
        if taken:
            session.add(
                FinetuneEvent(
                    job_id=run.job_id,
                    level="info",
                    message=f"{which} evaluation {evaluation_id}: the answers of the checkpoint "
                    f"evaluation at step {answers['step']} (the same weights) for "
                    f"{', '.join(taken)}, not generated again",
                    data={"evaluation_id": evaluation_id, "step": answers["step"], "suites": taken},
                )
            )


def _child(run: StageRun, label: str) -> str | None:
    """The job's own evaluation with this label (the newest), if an earlier attempt made it."""
    with run.ctx.sessionmaker() as session:
        return session.scalars(
            select(Evaluation.id)
            .where(Evaluation.finetune_job_id == run.job_id, Evaluation.label == label)
            .order_by(Evaluation.created_at.desc())
            .limit(1)
        ).first()


def compare(run: StageRun, before_id: str, after_id: str) -> dict[str, Any]:
    """The comparison of the before and after evaluations under the job's gate options."""
    run.stage("comparing")
    with run.ctx.sessionmaker() as session:
        return comparison.compare(
            session=session,
            before_id=before_id,
            after_id=after_id,
            options=run.request.compare_options(),
        )


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The numbers of an evaluation worth an event: accuracy, checklist score, NLL/token."""
    out: dict[str, Any] = {}
    for name, result in results.items():
        kind = result.get("kind")
        if kind in ("qa", "multiple_choice"):
            out[name] = {"overall_accuracy": result.get("overall_accuracy")}
        elif kind == "checklist":
            out[name] = {"score": result.get("score")}
        elif kind == "perplexity":
            out[name] = {k: v for k, v in result.items() if "nll" in k}
    return out
