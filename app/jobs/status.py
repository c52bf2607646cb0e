"""A job's status: the only place its values and the moves between them are defined.

Every write of a job's status goes through a function in ``app.jobs`` (``queue`` for the
lease-holding worker and cancellation, ``lifecycle`` for submission, the cache and the
evaluations a fine-tune job runs inside itself); tests/test_layout.py checks that no code
elsewhere assigns one. This module imports nothing, so the SQL models can use it too.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    """Where a job stands; stored, compared and serialized as its lowercase value."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


# A finished job never changes again; a live one is waiting or being worked on.
FINISHED = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
LIVE = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})

# The moves a job may make. queued → succeeded is the cache answering a new evaluation;
# queued → failed is a fine-tune job failing before it started one of its own evaluations;
# running → queued is a release (shutdown), a retry after a failed attempt, or an expired lease.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset(
        {JobStatus.RUNNING, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}
    ),
    JobStatus.RUNNING: frozenset(
        {JobStatus.QUEUED, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}
    ),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


def can_move(current: str, new: str) -> bool:
    """Whether a job in status ``current`` may be moved to ``new``."""
    return JobStatus(new) in TRANSITIONS[JobStatus(current)]


def sources(new: JobStatus) -> tuple[JobStatus, ...]:
    """The statuses a job may be in to move to ``new`` (for an UPDATE's WHERE clause)."""
    return tuple(s for s in JobStatus if new in TRANSITIONS[s])
