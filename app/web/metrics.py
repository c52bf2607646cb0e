"""Prometheus metrics, computed from the database at scrape time (``GET /metrics``).

The API process has no view of worker internals and keeps no in-process counters (there may be
several API replicas, and workers live on other hosts). Everything is read from the tables the
workers write: jobs, evaluation items, the ``claims`` log and ``workers``. Counters and
histograms are computed over all stored rows, so they only ever go up while rows are kept, as
Prometheus expects; gauges describe the present. Every time is read by the database's clock,
the same clock that workers write with.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy import ColumnElement, and_, case, func, select
from sqlalchemy.orm import Session

from app.core.tables import Claim, Evaluation, EvaluationItem, Worker
from app.jobs.queue import JOB_MODELS, claimable, db_now
from app.jobs.status import JobStatus

# Job durations run from seconds (a cached evaluation) to hours (a full fine-tune).
DURATION_BUCKETS: tuple[float, ...] = (
    1,
    5,
    15,
    30,
    60,
    120,
    300,
    600,
    1800,
    3600,
    7200,
    21600,
    86400,
)
# Throughput is averaged over the evaluations that finished in this window.
THROUGHPUT_WINDOW = timedelta(minutes=15)


@dataclass(frozen=True)
class FailureReason:
    """One class of failure, recognised in a failed job's ``error`` text."""

    name: str
    pattern: re.Pattern[str]


def _reason(name: str, pattern: str) -> FailureReason:
    return FailureReason(name, re.compile(pattern, re.IGNORECASE))


# First match wins; the label set stays small and fixed whatever the error texts say.
FAILURE_REASONS: tuple[FailureReason, ...] = (
    _reason("lease_expired", r"lease expired"),
    _reason("out_of_memory", r"out of memory|OutOfMemoryError"),
    _reason("path_not_allowed", r"outside the allowed roots"),
    _reason(
        "invalid_model",
        r"safetensors|pickle weights|auto_map|config\.json|not a directory"
        r"|adapter path|model config|model directory",
    ),
    _reason("invalid_request", r"prompt_format|chat template|suite|dataset"),
    _reason("database", r"OperationalError|DBAPIError|IntegrityError|psycopg|sqlite3"),
    _reason("timeout", r"timed? ?out|Timeout"),
    _reason("worker_error", r"^(attempt \d+ failed: )?[A-Za-z_][\w.]*(Error|Exception)\b"),
)
OTHER_REASON = "other"


def classify_failure(error: str | None) -> str:
    """The failure-reason label for a failed job's ``error`` text."""
    text = error or ""
    for reason in FAILURE_REASONS:
        if reason.pattern.search(text):
            return reason.name
    return OTHER_REASON


def _seconds(session: Session, start: Any, end: Any) -> ColumnElement[Any]:
    """``end - start`` in seconds, in the database's own date arithmetic."""
    if session.get_bind().dialect.name == "postgresql":
        return func.extract("epoch", end - start)
    return (func.julianday(end) - func.julianday(start)) * 86400.0


def _histogram_buckets(counts: Sequence[float], bounds: Sequence[float]) -> list[tuple[str, float]]:
    """``(le, count)`` pairs for Prometheus; ``counts`` are cumulative already, ``+Inf`` last."""
    return [(floatToGoString(b), float(c)) for b, c in zip(bounds, counts, strict=True)]


class DatabaseCollector(Collector):
    """Reads queue depth, durations, throughput, workers and failures from the database.

    Built per scrape around one session; ``live_after`` is the heartbeat age past which a
    worker no longer counts as live (one lease period, as ``GET /workers`` uses).
    """

    def __init__(self, session: Session, *, lease_seconds: float) -> None:
        self.session = session
        self.lease_seconds = lease_seconds

    def collect(self) -> Iterator[Metric]:
        """Yield every metric family; each is one or two aggregate queries."""
        now = db_now(self.session)
        collectors: tuple[Callable[[datetime], Iterable[Metric]], ...] = (
            self._queue,
            self._durations,
            self._throughput,
            self._workers,
            self._failures,
            self._claims,
        )
        for produce in collectors:
            yield from produce(now)

    def _queue(self, now: datetime) -> Iterable[Metric]:
        depth = GaugeMetricFamily(
            "forgetguard_queue_depth",
            "Jobs a worker takes, by kind and status (a sharded evaluation counts as its shards).",
            labels=["kind", "status"],
        )
        oldest = GaugeMetricFamily(
            "forgetguard_queue_oldest_age_seconds",
            "Age of the oldest queued job (0 when none is queued).",
            labels=["kind"],
        )
        for kind, model in JOB_MODELS.items():
            counts: dict[str, int] = dict(
                self.session.execute(
                    select(model.status, func.count())
                    .where(claimable(model))
                    .group_by(model.status)
                ).all()
            )
            for status in JobStatus:
                depth.add_metric([kind, status.value], float(counts.get(status, 0)))
            first = self.session.execute(
                select(func.min(model.created_at)).where(
                    model.status == JobStatus.QUEUED, claimable(model)
                )
            ).scalar_one()
            oldest.add_metric([kind], max(0.0, (now - first).total_seconds()) if first else 0.0)
        return (depth, oldest)

    def _durations(self, _now: datetime) -> Iterable[Metric]:
        histogram = HistogramMetricFamily(
            "forgetguard_job_duration_seconds",
            "Wall time from a job's first start to its end (retries included), finished jobs.",
            labels=["kind", "status"],
        )
        bounds = (*DURATION_BUCKETS, float("inf"))
        for kind, model in JOB_MODELS.items():
            seconds = _seconds(self.session, model.started_at, model.finished_at)
            finished = and_(model.finished_at.is_not(None), model.started_at.is_not(None))
            columns = [func.sum(case((seconds <= bound, 1), else_=0)) for bound in DURATION_BUCKETS]
            rows = self.session.execute(
                select(model.status, func.count(), func.coalesce(func.sum(seconds), 0.0), *columns)
                .where(finished)
                .group_by(model.status)
            ).all()
            for status, count, total, *cumulative in rows:
                buckets = _histogram_buckets([*(c or 0 for c in cumulative), count], bounds)
                histogram.add_metric([kind, status], buckets, sum_value=float(total))
        return (histogram,)

    def _throughput(self, now: datetime) -> Iterable[Metric]:
        since = now - THROUGHPUT_WINDOW
        items = (
            select(func.count())
            .where(EvaluationItem.evaluation_id == Evaluation.id)
            .correlate(Evaluation)
            .scalar_subquery()
        )
        seconds = _seconds(self.session, Evaluation.started_at, Evaluation.finished_at)
        count, total_items, total_seconds = self.session.execute(
            select(
                func.count(),
                func.coalesce(func.sum(items), 0),
                func.coalesce(func.sum(seconds), 0.0),
            ).where(
                Evaluation.status == JobStatus.SUCCEEDED,
                Evaluation.finished_at >= since,
                Evaluation.started_at.is_not(None),
                Evaluation.cached_from.is_(None),  # answered from the cache: nothing was computed
                Evaluation.shard_of.is_(None),  # a shard's items are its evaluation's
            )
        ).one()
        rate = GaugeMetricFamily(
            "forgetguard_evaluation_items_per_second",
            f"Items scored per second of evaluation wall time, over evaluations finished in the "
            f"last {int(THROUGHPUT_WINDOW.total_seconds())} s (0 when none).",
        )
        rate.add_metric([], float(total_items) / float(total_seconds) if total_seconds else 0.0)
        recent = GaugeMetricFamily(
            "forgetguard_evaluations_finished_recently",
            f"Evaluations that succeeded in the last {int(THROUGHPUT_WINDOW.total_seconds())} s.",
        )
        recent.add_metric([], float(count))
        return (rate, recent)

    def _workers(self, now: datetime) -> Iterable[Metric]:
        cutoff = now - timedelta(seconds=self.lease_seconds)
        counts: dict[str, int] = dict(
            self.session.execute(
                select(Worker.status, func.count())
                .where(Worker.heartbeat_at >= cutoff)
                .group_by(Worker.status)
            ).all()
        )
        gauge = GaugeMetricFamily(
            "forgetguard_workers",
            "Live workers (heartbeat within one lease period) by status.",
            labels=["status"],
        )
        for status in sorted({"idle", "busy", *counts}):
            gauge.add_metric([status], float(counts.get(status, 0)))
        return (gauge,)

    def _failures(self, _now: datetime) -> Iterable[Metric]:
        failures = CounterMetricFamily(
            "forgetguard_job_failures",
            "Jobs that ended failed, by kind and reason (classified from the error text).",
            labels=["kind", "reason"],
        )
        names = [r.name for r in FAILURE_REASONS] + [OTHER_REASON]
        for kind, model in JOB_MODELS.items():
            totals = dict.fromkeys(names, 0)
            rows = self.session.execute(
                select(model.error, func.count())
                .where(model.status == JobStatus.FAILED)
                .group_by(model.error)
            )
            for error, count in rows:
                totals[classify_failure(error)] += count
            for name in names:
                failures.add_metric([kind, name], float(totals[name]))
        return (failures,)

    def _claims(self, now: datetime) -> Iterable[Metric]:
        claims = CounterMetricFamily(
            "forgetguard_job_claims", "Leases taken (attempts started), by kind.", labels=["kind"]
        )
        expired = CounterMetricFamily(
            "forgetguard_lease_expirations",
            "Leases that ran out without a release or an outcome (worker killed, host lost, "
            "heartbeats stopped), by kind.",
            labels=["kind"],
        )
        for kind, model in JOB_MODELS.items():
            total, lapsed = self.session.execute(
                select(
                    func.count(),
                    func.coalesce(
                        func.sum(
                            case(
                                (
                                    and_(
                                        Claim.released_at.is_(None),
                                        Claim.lease_expires_at < now,
                                        model.status != JobStatus.CANCELLED,
                                    ),
                                    1,
                                ),
                                else_=0,
                            )
                        ),
                        0,
                    ),
                )
                .select_from(Claim)
                .join(model, model.id == Claim.job_id)
                .where(Claim.job_kind == kind)
            ).one()
            claims.add_metric([kind], float(total))
            expired.add_metric([kind], float(lapsed))
        return (claims, expired)


def render(session: Session, *, lease_seconds: float, accept: str | None) -> tuple[bytes, str]:
    """The metrics page and its content type, in the format the scraper asked for."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import choose_encoder

    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(session, lease_seconds=lease_seconds))
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
