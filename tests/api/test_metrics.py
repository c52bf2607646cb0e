"""``GET /metrics``: Prometheus text computed from the database at scrape time."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.core.config import Settings
from app.core.database import make_engine, session_factory
from app.core.tables import Claim, Evaluation, EvaluationItem, FinetuneJob, Worker, new_id, utcnow
from app.web.metrics import classify_failure


def _evaluation(status: str, **values: Any) -> Evaluation:
    return Evaluation(
        id=new_id("ev"), model_path="m", generation={}, suites=[], status=status, **values
    )


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` from an exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def populated(settings: Settings) -> dict[str, Any]:
    """A queue in a known state: 2 queued, 1 running, 3 succeeded, 3 failed, live/stale workers."""
    engine = make_engine(settings.database_url)
    now = utcnow()
    with session_factory(engine)() as s:
        s.add_all(
            [_evaluation("queued", created_at=now - timedelta(seconds=90)), _evaluation("queued")]
        )
        running = _evaluation(
            "running",
            started_at=now,
            worker_id="w-busy",
            lease_expires_at=now + timedelta(seconds=60),
        )
        s.add(running)
        durations = [4.0, 20.0, 100.0]
        done = []
        for seconds in durations:
            row = _evaluation(
                "succeeded",
                started_at=now - timedelta(seconds=seconds + 1),
                finished_at=now - timedelta(seconds=1),
            )
            done.append(row)
        s.add_all(done)
        s.add_all(
            [
                _evaluation(
                    "failed",
                    started_at=now,
                    finished_at=now,
                    error="lease expired: the worker stopped heartbeating on its last "
                    "allowed attempt",
                ),
                _evaluation(
                    "failed",
                    started_at=now,
                    finished_at=now,
                    error="OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB",
                ),
                _evaluation(
                    "failed",
                    started_at=now,
                    finished_at=now,
                    error="model path 'x' is outside the allowed roots ['/models']",
                ),
            ]
        )
        s.add(FinetuneJob(id=new_id("ft"), base_model_path="m", request={}, status="queued"))
        s.flush()
        # 10 items on the 4 s evaluation, 30 on the 20 s one: (40 items) / (24 s) per second.
        for row, count in ((done[0], 10), (done[1], 30)):
            s.add_all(
                EvaluationItem(
                    evaluation_id=row.id, suite="qa", item_id=f"i{i}", position=i, prompt="p"
                )
                for i in range(count)
            )
        s.add_all(
            [
                Worker(
                    id="w-busy",
                    host="h1",
                    pid=1,
                    device="cuda:0",
                    kinds=["evaluation"],
                    status="busy",
                    heartbeat_at=now,
                ),
                Worker(
                    id="w-idle",
                    host="h2",
                    pid=2,
                    device="cuda:0",
                    kinds=["evaluation"],
                    status="idle",
                    heartbeat_at=now,
                ),
                Worker(
                    id="w-gone",
                    host="h3",
                    pid=3,
                    device="cpu",
                    kinds=["evaluation"],
                    status="busy",
                    heartbeat_at=now - timedelta(hours=1),
                ),
            ]
        )
        s.add_all(
            [
                # A lease that ran out (its worker was killed), then the successful retry.
                Claim(
                    job_kind="evaluation",
                    job_id=done[2].id,
                    worker_id="w-gone",
                    attempt=1,
                    claimed_at=now - timedelta(seconds=101),
                    lease_expires_at=now - timedelta(seconds=60),
                ),
                Claim(
                    job_kind="evaluation",
                    job_id=done[2].id,
                    worker_id="w-idle",
                    attempt=2,
                    claimed_at=now - timedelta(seconds=59),
                    lease_expires_at=now,
                    released_at=now - timedelta(seconds=1),
                ),
                # The running job's live lease is not an expiration.
                Claim(
                    job_kind="evaluation",
                    job_id=running.id,
                    worker_id="w-busy",
                    attempt=1,
                    claimed_at=now,
                    lease_expires_at=now + timedelta(seconds=60),
                ),
            ]
        )
        s.commit()
    engine.dispose()
    return {"durations": durations}


def test_metrics_is_prometheus_text(client) -> None:  # type: ignore[no-untyped-def]
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    names = {family.name for family in text_string_to_metric_families(response.text)}
    assert {
        "forgetguard_queue_depth",
        "forgetguard_job_duration_seconds",
        "forgetguard_evaluation_items_per_second",
        "forgetguard_workers",
        "forgetguard_job_failures",
        "forgetguard_lease_expirations",
    } <= names


def test_metrics_speak_openmetrics_when_asked(client) -> None:  # type: ignore[no-untyped-def]
    response = client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")


def test_metrics_count_the_queue_from_the_database(client, populated) -> None:  # type: ignore[no-untyped-def]
    samples = _samples(client.get("/metrics").text)
    depth = "forgetguard_queue_depth"
    assert _value(samples, depth, kind="evaluation", status="queued") == 2
    assert _value(samples, depth, kind="evaluation", status="running") == 1
    assert _value(samples, depth, kind="evaluation", status="succeeded") == 3
    assert _value(samples, depth, kind="evaluation", status="failed") == 3
    assert _value(samples, depth, kind="evaluation", status="cancelled") == 0
    assert _value(samples, depth, kind="finetune", status="queued") == 1
    assert _value(samples, "forgetguard_queue_oldest_age_seconds", kind="evaluation") >= 89
    assert _value(samples, "forgetguard_queue_oldest_age_seconds", kind="finetune") < 60


def test_metrics_histogram_of_job_durations(client, populated) -> None:  # type: ignore[no-untyped-def]
    samples = _samples(client.get("/metrics").text)
    name = "forgetguard_job_duration_seconds"
    labels = {"kind": "evaluation", "status": "succeeded"}
    assert _value(samples, f"{name}_count", **labels) == 3
    assert _value(samples, f"{name}_sum", **labels) == pytest.approx(124.0, abs=0.5)
    assert _value(samples, f"{name}_bucket", le="5.0", **labels) == 1
    assert _value(samples, f"{name}_bucket", le="30.0", **labels) == 2
    assert _value(samples, f"{name}_bucket", le="60.0", **labels) == 2
    assert _value(samples, f"{name}_bucket", le="+Inf", **labels) == 3
    failed = {"kind": "evaluation", "status": "failed"}
    assert _value(samples, f"{name}_count", **failed) == 3


def test_metrics_items_per_second_from_recent_evaluations(client, populated) -> None:  # type: ignore[no-untyped-def]
    samples = _samples(client.get("/metrics").text)
    # 40 stored items over 4 + 20 + 100 s of recently finished evaluation time.
    assert _value(samples, "forgetguard_evaluation_items_per_second") == pytest.approx(
        40 / 124, rel=0.01
    )
    assert _value(samples, "forgetguard_evaluations_finished_recently") == 3


def test_metrics_count_live_workers_only(client, populated) -> None:  # type: ignore[no-untyped-def]
    samples = _samples(client.get("/metrics").text)
    assert _value(samples, "forgetguard_workers", status="busy") == 1  # w-gone is stale
    assert _value(samples, "forgetguard_workers", status="idle") == 1


def test_metrics_failures_by_reason_and_lease_expirations(client, populated) -> None:  # type: ignore[no-untyped-def]
    samples = _samples(client.get("/metrics").text)
    name = "forgetguard_job_failures_total"
    assert _value(samples, name, kind="evaluation", reason="lease_expired") == 1
    assert _value(samples, name, kind="evaluation", reason="out_of_memory") == 1
    assert _value(samples, name, kind="evaluation", reason="path_not_allowed") == 1
    assert _value(samples, name, kind="evaluation", reason="other") == 0
    assert _value(samples, "forgetguard_lease_expirations_total", kind="evaluation") == 1
    assert _value(samples, "forgetguard_job_claims_total", kind="evaluation") == 3


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (
            "lease expired: the worker stopped heartbeating on its last allowed attempt",
            "lease_expired",
        ),
        ("OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB", "out_of_memory"),
        ("model path 'm' is outside the allowed roots ['/models']", "path_not_allowed"),
        ("model m has no *.safetensors weights", "invalid_model"),
        ("prompt_format 'chat' needs a chat template; m has none", "invalid_request"),
        ("OperationalError: (psycopg.OperationalError) connection refused", "database"),
        ("ValueError: prompt 3 is empty", "worker_error"),
        ("attempt 2 failed: RuntimeError: boom", "worker_error"),
        ("something odd", "other"),
        (None, "other"),
    ],
)
def test_failure_reasons_are_a_small_fixed_set(error: str | None, reason: str) -> None:
    assert classify_failure(error) == reason


def test_a_sharded_evaluation_counts_in_the_queue_as_its_shards(client, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import qa_suite

    response = client.post(
        "/evaluations",
        json={
            "model": {"path": str(tiny_model_dir)},
            "suites": [qa_suite("metrics-shards", 96)],
            "cache": False,
            "shards": 3,
        },
    )
    assert response.status_code == 202, response.text
    samples = _samples(client.get("/metrics").text)
    # Three shard jobs a worker can take; the evaluation they make up is never claimed.
    assert _value(samples, "forgetguard_queue_depth", kind="evaluation", status="queued") == 3
