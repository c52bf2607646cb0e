"""Bounded concurrent load on a real ``forgetguard serve`` (loopback): no 5xx, one job per key.

It asserts status codes and rows, never latency, so a slow machine cannot make it flaky.
Under this load the API used to run out of database connections (``QueuePool limit reached``,
500) on both databases, and concurrent cancels on SQLite failed with ``database is locked``.
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, func, select

from app.core.config import Settings
from app.core.tables import Evaluation
from tests.conftest import start_serve

# 200 requests of each kind would be 600; the whole run stays within 300 by mixing kinds.
SAME_KEY_POSTS = 100
CANCELS = 100
READS = 100


async def _burst(base_url: str, model: str, job_id: str) -> list[tuple[str, int, str]]:
    limits = httpx.Limits(max_connections=300, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as http:

        async def call(kind: str, method: str, url: str, **kwargs: Any) -> tuple[str, int, str]:
            response = await http.request(method, url, **kwargs)
            return kind, response.status_code, response.text[:300]

        calls = []
        for i in range(SAME_KEY_POSTS):
            body = {"model": {"path": model}, "suites": ["general-qa"], "label": f"load-{i}"}
            headers = {"Idempotency-Key": "one-key-for-all"}
            calls.append(call("post", "POST", "/evaluations", json=body, headers=headers))
        for _ in range(CANCELS):
            calls.append(call("cancel", "POST", f"/evaluations/{job_id}/cancel"))
        for i in range(READS):
            url = ("/evaluations?limit=5", f"/evaluations/{job_id}", "/suites", "/workers")[i % 4]
            calls.append(call("read", "GET", url))
        # Interleave the kinds so they truly overlap.
        ordered = [calls[i] for k in range(3) for i in range(k, len(calls), 3)]
        return await asyncio.gather(*ordered)


@pytest.mark.slow
def test_concurrent_posts_cancels_and_reads_give_no_5xx_and_one_job_per_key(
    settings: Settings, tiny_model_dir: Path, tmp_path: Path
) -> None:
    server, http = start_serve(settings, "--workers", "0", log=tmp_path / "serve.log")
    try:
        model = str(tiny_model_dir)
        first = http.post("/evaluations", json={"model": {"path": model}, "label": "target"})
        assert first.status_code == 202, first.text
        job_id = first.json()["id"]
        results = asyncio.run(_burst(str(http.base_url), model, job_id))
        assert http.get("/healthz").status_code == 200
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=90)
        http.close()

    assert len(results) == SAME_KEY_POSTS + CANCELS + READS <= 300
    errors = [r for r in results if r[1] >= 500]
    assert errors == [], f"{len(errors)} answers were 5xx, e.g. {errors[:3]}"
    by_kind = Counter((kind, status) for kind, status, _ in results)
    # One POST with the key created the job (202); the others carried different bodies (422).
    assert by_kind[("post", 202)] == 1, by_kind
    assert by_kind[("post", 422)] == SAME_KEY_POSTS - 1, by_kind
    assert by_kind[("cancel", 200)] == CANCELS, by_kind
    assert by_kind[("read", 200)] == READS, by_kind
    engine = create_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            created = conn.execute(
                select(func.count()).select_from(Evaluation).where(Evaluation.label.like("load-%"))
            ).scalar_one()
            status = conn.execute(
                select(Evaluation.status).where(Evaluation.id == job_id)
            ).scalar_one()
    finally:
        engine.dispose()
    assert created == 1
    assert status == "cancelled"
    log = (tmp_path / "serve.log").read_text(errors="replace")
    assert "QueuePool limit" not in log and "database is locked" not in log
