"""The names of a job's status, as the API serializes them: defined once, here.

The client package holds them so that the Python client, the gate and the server agree without
the client importing the server; the server's lifecycle (``app.jobs.status``) imports them and
adds the moves between them. This module imports nothing beyond the standard library.
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
# A finished job that did not succeed: waiting on it ends in an error.
UNSUCCESSFUL = frozenset({JobStatus.FAILED, JobStatus.CANCELLED})
