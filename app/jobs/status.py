"""A job's status: the moves between its values, and the only place a move is defined.

Every write of a job's status goes through a function in ``app.jobs`` (``queue`` for the
lease-holding worker and cancellation, ``lifecycle`` for submission, the cache and the
evaluations a fine-tune job runs inside itself); tests/test_layout.py checks that no code
elsewhere assigns one. The names themselves are the client package's
(``forgetguard.status``, standard library only), so the client, the gate and the server agree;
this module adds the moves between them, and the SQL models can use it too.
"""

from __future__ import annotations

from forgetguard.status import FINISHED, LIVE, JobStatus

__all__ = ["FINISHED", "LIVE", "TRANSITIONS", "JobStatus", "can_move", "sources"]

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
