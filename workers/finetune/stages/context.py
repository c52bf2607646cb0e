"""What a stage of a fine-tune job sees of the job: a typed :class:`StageRun`, not the job.

:class:`workers.finetune.job.FinetuneRun` is the one implementation; a test can hand a stage a
small object of its own with these members. ``Reports`` is how a stage says what it does
(events, warnings, its stage and progress, all under the job's lease); the rest is what it
reads: the request and its hyperparameters (resolved at submission), the job's files, the
worker's settings, device and models, and the claimed job's context.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from app.core.config import Settings
    from app.core.tables import FinetuneJob
    from app.finetune.schemas import FinetuneJobCreate, ResolvedHyperparameters
    from workers.context import JobContext
    from workers.engine.loading import ModelCache
    from workers.progress import Tracker


class Reports(Protocol):
    """How a stage records what it does, under the job's lease."""

    tracker: Tracker

    def event(
        self,
        message: str,
        *,
        level: str = "info",
        data: dict[str, Any] | None = None,
        **values: Any,
    ) -> None: ...

    def warn(self, message: str, data: dict[str, Any] | None = None) -> None: ...

    def stage(
        self,
        stage: str,
        *,
        phase: str | None = None,
        done: int | None = None,
        total: int | None = None,
        unit: str = "items",
        data: dict[str, Any] | None = None,
    ) -> None: ...

    def progress(self, phase: str, *, unit: str = "items", store: Any = ..., **at: Any) -> Any: ...


class StageRun(Reports, Protocol):
    """The running job as its stages see it."""

    job_id: str
    job_dir: Path
    request: FinetuneJobCreate
    hp: ResolvedHyperparameters
    settings: Settings
    device: torch.device
    models: ModelCache
    ctx: JobContext

    def job(self) -> FinetuneJob:
        """The job's row as stored now (its evaluation ids, status …)."""
        ...
