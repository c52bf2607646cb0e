"""How a wait shows itself: a live bar per job on a terminal; without one (a CI log), a line
per job when its state changes and at least every ``every`` seconds, so a long wait is never
silent and never floods the log."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from forgetguard.client import Evaluation, FinetuneJob
from forgetguard.status import JobStatus
from forgetguard.text import duration, one_line


def describe(role: str, job: Evaluation | FinetuneJob) -> str:
    """``before ev_…: running (stage)`` (and ``(cached)`` for an evaluation from the cache)."""
    status = str(job.status)
    stage = one_line(job.progress.stage, 80)
    if job.status == JobStatus.RUNNING and stage:
        status = f"running ({stage})"
    cached = " (cached)" if getattr(job, "cached_from", None) else ""
    prefix = f"{role} " if role else ""
    return f"{prefix}{one_line(job.id, 80)}{cached}: {status}"


def counts(job: Evaluation | FinetuneJob) -> str:
    """`` 12/40, 37% of the job, ETA 2m 05s``: the stage's count, then the whole job's
    figure while it runs (the ETA once the worker has measured the work ahead)."""
    progress = job.progress
    out = f" {progress.done}/{progress.total}" if progress.total else ""
    if job.status == JobStatus.RUNNING and progress.percent is not None:
        out += f", {progress.percent:.0f}% of the job"
        if progress.eta_seconds is not None:
            out += f", ETA {duration(progress.eta_seconds)}"
    return out


class WaitDisplay:
    """The progress of the jobs one wait polls; ``ids`` maps a role (``before``…) to a job id.

    Use as a context manager and pass :meth:`update` as ``Client.wait``'s ``on_progress``.
    ``bars=False`` prints lines even on a terminal (a fine-tune job has stages, not items).
    """

    def __init__(
        self,
        console: Console,
        ids: Mapping[str, str],
        *,
        every: float,
        bars: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.console = console
        self.roles: dict[str, list[str]] = {}
        for role, job_id in ids.items():
            self.roles.setdefault(job_id, []).append(role)
        self.every = every
        self.clock = clock
        self.started = clock()
        self.live = bars and console.is_terminal
        self.progress: Progress | None = None
        self.tasks: dict[str, TaskID] = {}
        self.shown: dict[str, tuple[str, float]] = {}

    def __enter__(self) -> WaitDisplay:
        if self.live:
            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
                transient=False,
            )
            self.progress.start()
            for roles in self.roles.values():
                for role in roles:
                    self.tasks[role] = self.progress.add_task(role, total=None)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.progress is not None:
            self.progress.stop()

    def update(self, job: Evaluation | FinetuneJob) -> None:
        """One poll's state of ``job``."""
        total = job.progress.total or None
        done = total if job.status == JobStatus.SUCCEEDED else job.progress.done
        for role in self.roles.get(job.id, [job.id]):
            line = describe(role, job)
            if self.progress is not None and role in self.tasks:
                self.progress.update(
                    self.tasks[role], description=line, completed=done or 0, total=total
                )
                continue
            now = self.clock()
            last_line, last_time = self.shown.get(role, ("", -float("inf")))
            if line != last_line or now - last_time >= self.every:
                self.console.print(
                    f"{line}{counts(job)}, {duration(now - self.started)}",
                    markup=False,
                    highlight=False,
                    soft_wrap=True,
                )
                self.shown[role] = (line, now)
