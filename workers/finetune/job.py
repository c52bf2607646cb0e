"""Run one fine-tune job: evaluate the base, train, save, evaluate the result, compare.

:class:`FinetuneRun` only sequences the stages (``workers/finetune/stages``) and records
events and job fields under the lease; the training loop is ``training.py``, the job
directory's layout and output ``artifacts.py``.

A job is resumable at every stage: child evaluations resume from their stored items, the
training data is snapshotted on the first attempt (``train.jsonl``), training resumes from the
last checkpoint, and a finished training (``training.json``) is never repeated.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Literal

from app.core.errors import Problem
from app.core.fingerprint import fingerprint
from app.core.tables import FinetuneEvent, FinetuneJob, utcnow
from app.finetune import service as jobs
from app.finetune.schemas import FinetuneJobCreate, evaluation_count
from app.jobs import lifecycle
from app.jobs.queue import LeaseLost, guarded_write, set_job, succeed
from app.jobs.status import JobStatus
from workers.context import Interrupted, JobContext, UserError
from workers.engine import quantization as quantized
from workers.engine.loading import ModelCache, load_tokenizer, resolve_model
from workers.finetune import distributed
from workers.finetune.artifacts import CHECKPOINTS, TRAINING_DONE, TrainingOutcome
from workers.finetune.data import effective_format
from workers.finetune.stages.domain import evaluate_domain, with_domain
from workers.finetune.stages.evaluation import (
    compare,
    evaluate,
    evaluation_definitions,
    final_answers,
)
from workers.finetune.stages.interpolation import interpolate
from workers.finetune.stages.training import run_training
from workers.finetune.statefile import read_state
from workers.progress import Phase, Tracker, finished

log = logging.getLogger("forgetguard.worker")

Store = Literal["now", "throttled", "no"]


def plan(request: FinetuneJobCreate, planned_steps: int | None, items: int) -> list[Phase]:
    """The phases a job expects at its start (``items``: its general suites' items); each
    gets its exact size when it begins, and work found on the way joins the plan then."""
    steps = planned_steps or 0
    spec = request.evaluation
    training = Phase("training", "steps", steps)
    if spec is None:
        return [training]
    checkpoints = evaluation_count(steps, spec.every_steps, spec.checkpoints)
    return [
        Phase("before evaluation", "items", items),
        training,
        *([Phase("checkpoint evaluations", "items", checkpoints * items)] if checkpoints else []),
        Phase("after evaluation", "items", items),
    ]


class FinetuneRun:
    """One attempt at a fine-tune job; every stage can resume what an earlier attempt left."""

    def __init__(self, ctx: JobContext, models: ModelCache) -> None:
        self.ctx = ctx
        self.models = models
        self.settings = ctx.settings
        self.job_id = ctx.job.id
        with ctx.sessionmaker() as session:
            row = session.get(FinetuneJob, self.job_id)
            assert row is not None, f"fine-tune job {self.job_id} vanished"
            self.request = FinetuneJobCreate.model_validate(row.request)
            self.max_attempts = row.max_attempts
            self.hp = jobs.hyperparameters(row)
            self.planned_steps = jobs.planned_steps(row)
        self.tracker = Tracker([])  # planned in _run, once the suites' sizes are known
        self._progress_written = 0.0
        self.job_dir = self.settings.artifacts_dir / self.job_id
        self.device = models.device

    # -- events and job fields

    def event(
        self,
        message: str,
        *,
        level: str = "info",
        data: dict[str, Any] | None = None,
        **values: Any,
    ) -> None:
        """Record an event (and set job fields) under the lease; LeaseLost if it is gone."""
        lease = self.settings.lease_seconds
        with guarded_write(self.ctx.engine, self.ctx.job, lease, **values) as session:
            session.add(FinetuneEvent(job_id=self.job_id, level=level, message=message, data=data))

    def warn(self, message: str, data: dict[str, Any] | None = None) -> None:
        """Add a warning to the job and to its events."""
        with guarded_write(self.ctx.engine, self.ctx.job, self.settings.lease_seconds) as session:
            row = session.get(FinetuneJob, self.job_id)
            warnings = list(row.warnings or []) if row is not None else []
            if message not in warnings:
                warnings.append(message)
            set_job(session, self.ctx.job, warnings=warnings)
            session.add(
                FinetuneEvent(job_id=self.job_id, level="warning", message=message, data=data)
            )
        log.warning("finetune %s: %s", self.job_id, message)

    def stage(
        self,
        stage: str,
        *,
        phase: str | None = None,
        done: int | None = None,
        total: int | None = None,
        unit: str = "items",
        data: dict[str, Any] | None = None,
    ) -> None:
        """An event for the stage beginning; ``phase`` (default: the stage) is its part of
        the job's progress, counted in ``unit``."""
        progress = self.tracker.at(
            phase or stage, done=done, total=total, unit=unit, stage=stage, measured=False
        )
        self.event(f"stage: {stage}", data={"stage": stage, **(data or {})}, progress=progress)
        self._progress_written = time.monotonic()
        log.info("finetune %s: %s", self.job_id, stage)

    def progress(
        self, phase: str, *, unit: str = "items", store: Store = "throttled", **at: Any
    ) -> dict[str, Any]:
        """Move ``phase`` (:meth:`Tracker.at`'s arguments) and return the job's progress,
        stored (renewing the lease) ``now``, at most every ``settings.progress_seconds``
        (``throttled``), or by the caller with an event of its own (``no``)."""
        progress = self.tracker.at(phase, unit=unit, **at)
        now = time.monotonic()
        due = now - self._progress_written >= self.settings.progress_seconds
        if store == "now" or (store == "throttled" and due):
            self._progress_written = now
            with guarded_write(
                self.ctx.engine, self.ctx.job, self.settings.lease_seconds, progress=progress
            ):
                pass
        return progress

    def job(self) -> FinetuneJob:
        with self.ctx.sessionmaker() as session:
            row = session.get(FinetuneJob, self.job_id)
            assert row is not None
            return row

    # -- the whole job

    def run(self) -> None:
        try:
            self._run()
        except (UserError, Problem) as exc:
            self._fail_children(exc.detail if isinstance(exc, Problem) else str(exc))
            raise
        except (Interrupted, LeaseLost):
            if self._status() == JobStatus.CANCELLED:
                shutil.rmtree(self.job_dir / CHECKPOINTS, ignore_errors=True)
            raise
        except Exception as exc:
            if self.ctx.job.attempt >= self.max_attempts:  # no retry follows: close the children
                self._fail_children(f"{type(exc).__name__}: {exc}")
            raise

    def _status(self) -> str | None:
        with self.ctx.sessionmaker() as session:
            row = session.get(FinetuneJob, self.job_id)
            return row.status if row is not None else None

    def _fail_children(self, reason: str) -> None:
        try:
            with guarded_write(
                self.ctx.engine, self.ctx.job, self.settings.lease_seconds
            ) as session:
                lifecycle.end_children(
                    session,
                    [self.job_id],
                    JobStatus.FAILED,
                    now=utcnow(),
                    error=f"fine-tune job {self.job_id} failed: {reason}"[:2000],
                )
        except LeaseLost:
            pass

    def _run(self) -> None:
        request, hp = self.request, self.hp
        if self.ctx.job.attempt > 1:
            self.event(
                f"attempt {self.ctx.job.attempt}: continuing where the last attempt stopped",
                data={"attempt": self.ctx.job.attempt},
            )
        if request.quantization is not None:
            # Before anything else: a worker without bitsandbytes refuses the job at once.
            quantized.require(request.quantization, self.device)
        if request.resources.processes > 1:  # and one without DeepSpeed a deepspeed group
            distributed.require(request.resources.strategy)
        try:
            base_dir, _ = resolve_model(self.settings, request.base_model.path, None)
        except Problem as exc:
            raise UserError(exc.detail) from None
        tokenizer = load_tokenizer(base_dir)
        base_fp = fingerprint(base_dir, cache_dir=self.settings.cache_dir)
        try:
            train_format = effective_format(tokenizer, request.dataset.prompt_format)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        eval_definitions = evaluation_definitions(self)
        self.tracker = Tracker(
            plan(request, self.planned_steps, sum(len(d["items"]) for d in eval_definitions))
        )

        before_id = None
        domain_before: tuple[dict[str, Any] | None, str | None] = (None, None)
        if request.evaluation is not None:
            before_id = evaluate(self, "before", request.base_model.path, None)
            domain_before = evaluate_domain(
                self, "before", request.base_model.path, None, train_format
            )

        done_marker = self.job_dir / TRAINING_DONE
        done = training_done(done_marker)
        if request.from_job is not None:  # an interpolation of another job's fine-tune
            done = training_done(self.settings.artifacts_dir / request.from_job / TRAINING_DONE)
            if done is None:
                raise UserError(
                    f"the training output of fine-tune job {request.from_job} is gone or unreadable"
                )
        if done is not None:
            outcome = done
            self.tracker.skip("training", "checkpoint evaluations")
            self.event("training already finished in an earlier attempt; not repeated")
        else:  # never finished, or its record is unreadable: the training stage runs again
            outcome = run_training(
                self, base_dir, tokenizer, base_fp, train_format, eval_definitions, hp
            )

        # What the last checkpoint evaluation answered, when the after-evaluation measures
        # the same weights (not an interpolation of them).
        answers = final_answers(self, outcome) if request.interpolation is None else None
        if request.interpolation is not None and request.evaluation is not None:
            self.models.clear()
            outcome, _ = interpolate(
                self, base_dir, tokenizer, train_format, eval_definitions, outcome
            )

        after_id = comparison_body = None
        if request.evaluation is not None:
            # When nothing was shipped, the final weights are measured: the evidence for that.
            trained = outcome.output_path or outcome.metrics["final_output_path"]
            model_path, adapter_path = (
                (request.base_model.path, trained) if request.adapter else (trained, None)
            )
            after_id = evaluate(self, "after", model_path, adapter_path, answers=answers)
            assert before_id is not None
            domain_after = evaluate_domain(
                self, "after", model_path, adapter_path, train_format, answers=answers
            )
            comparison_body = compare(self, before_id, after_id)
            comparison_body = with_domain(
                self,
                comparison_body,
                (domain_before[0], domain_after[0]),
                (domain_before[1], domain_after[1]),
            )

        steps = outcome.metrics.get("total_steps", 0)
        with guarded_write(self.ctx.engine, self.ctx.job, self.settings.lease_seconds) as session:
            summary: dict[str, Any] = {"output_path": outcome.output_path}
            if comparison_body is not None:
                summary.update(
                    {
                        k: comparison_body.get(k)
                        for k in (
                            "verdict",
                            "reasons",
                            "overall_accuracy_before",
                            "overall_accuracy_after",
                            "accuracy_drop",
                            "catastrophic_forgetting_detected",
                            "outcome",
                            "outcome_summary",
                        )
                    }
                )
            session.add(
                FinetuneEvent(
                    job_id=self.job_id,
                    level="info",
                    data=summary,
                    message=f"succeeded: verdict {summary.get('verdict', 'n/a')}",
                )
            )
            session.flush()
            if not succeed(
                session,
                self.ctx.job,
                before_evaluation_id=before_id,
                after_evaluation_id=after_id,
                comparison=comparison_body,
                output_path=outcome.output_path,
                trainable_parameters=outcome.trainable_parameters,
                metrics=outcome.metrics,
                checkpoint_path=None,
                progress=finished(steps),
            ):
                raise LeaseLost(
                    f"finetune {self.job_id} is no longer held by {self.ctx.job.worker_id}"
                )
        log.info(
            "finetune %s: succeeded (%s)",
            self.job_id,
            comparison_body.get("verdict") if comparison_body else "no evaluation",
        )

    # -- evaluations


def training_done(path: Path) -> TrainingOutcome | None:
    """The outcome a finished training recorded; None when missing or unreadable."""
    state = read_state(path)
    if state is None:
        return None
    try:
        return TrainingOutcome(**state)
    except TypeError:
        log.warning("%s does not hold a training outcome; the training stage runs again", path)
        return None


def run_finetune(ctx: JobContext, models: ModelCache) -> None:
    """Entry point the worker calls for a claimed job of kind ``finetune``."""
    FinetuneRun(ctx, models).run()
