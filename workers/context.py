"""What a running job sees of its worker: the database, its lease, stop and cancel signals."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import Engine, update
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from app.core.tables import Evaluation, FinetuneJob
from app.jobs.queue import JOB_MODELS, ClaimedJob, LeaseLost, guarded_write, set_job

# Fault injection for tests that signal a real worker at a known point instead of on a timer:
# with HOLD_AT="<point>:<n>" the worker, once it has passed ``n`` at ``point`` ("step": a
# fine-tune's optimizer steps recorded; "items": an evaluation's items stored), waits until it is
# told to stop (SIGTERM) or killed. Never set in production; nothing else reads it.
HOLD_AT = "FORGETGUARD_HOLD_AT"


class Interrupted(Exception):
    """The worker is shutting down: release the job so another worker continues it."""


class UserError(Exception):
    """The job cannot succeed as submitted (retrying will not help)."""


@dataclass
class JobContext:
    engine: Engine
    sessionmaker: sessionmaker[Session]
    settings: Settings
    job: ClaimedJob
    stop: threading.Event = field(default_factory=threading.Event)
    lease_lost: threading.Event = field(default_factory=threading.Event)

    def check_stop(self) -> None:
        """Raise ``Interrupted`` when the worker was asked to stop (called between batches)."""
        if self.lease_lost.is_set():
            raise LeaseLost(
                f"{self.job.kind} {self.job.id} is no longer held by {self.job.worker_id}"
            )
        if self.stop.is_set():
            raise Interrupted("worker is shutting down")

    def hold_at(self, point: str, count: int) -> None:
        """Wait here for a stop when :data:`HOLD_AT` names this point and ``count`` reached it."""
        name, _, at = os.environ.get(HOLD_AT, "").partition(":")
        if name != point or not at.isdigit() or count < int(at):
            return
        while not (self.stop.wait(0.1) or self.lease_lost.is_set()):
            pass

    def user_error(self, message: str) -> UserError:
        return UserError(message)

    def set_stage(self, stage: str, *, done: int | None = None, total: int | None = None) -> None:
        """Record the current stage in the job's progress (and renew the lease)."""
        model = JOB_MODELS[self.job.kind]
        with guarded_write(self.engine, self.job, self.settings.lease_seconds) as session:
            row = cast("Evaluation | FinetuneJob | None", session.get(model, self.job.id))
            progress = dict(row.progress) if row is not None else {}
            progress["stage"] = stage
            if done is not None:
                progress["done"] = done
            if total is not None:
                progress["total"] = total
            set_job(session, self.job, progress=progress)

    def update_job(self, evaluation_id: str, **values: Any) -> None:
        """Set fields on an evaluation this job runs, under the job's lease."""
        with guarded_write(self.engine, self.job, self.settings.lease_seconds) as session:
            session.execute(
                update(Evaluation).where(Evaluation.id == evaluation_id).values(**values)
            )
