"""`forgetguard serve`: migrates, answers, starts a worker, and stops everything on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, settings_env, start_serve, wait_for


@pytest.mark.one_db
def test_sigterm_stops_api_and_workers_with_exit_0(settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    server, http = start_serve(settings, "--workers", "1", "--device", "cpu")
    try:
        workers = wait_for(
            lambda: http.get("/workers").json()["data"], 90, what="the local worker to register"
        )
        assert len(workers) == 1 and workers[0]["device"] == "cpu"
        worker_pid = workers[0]["pid"]
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=90)
    assert code == 0
    # The worker went with it.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(worker_pid):
        time.sleep(0.2)
    assert not _alive(worker_pid)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_refuses_public_bind_without_keys(settings) -> None:  # type: ignore[no-untyped-def]
    env = settings_env(settings)
    env.pop("FORGETGUARD_API_KEYS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--host", "0.0.0.0", "--workers", "0"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "refusing to bind 0.0.0.0 without API keys" in proc.stderr


@pytest.mark.one_db
@pytest.mark.slow
def test_sigkill_of_serve_leaves_no_worker_and_a_restart_runs_one(settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL gives serve no chance to stop its workers: they notice on their own and exit."""
    server, http = start_serve(settings, "--workers", "1", "--device", "cpu")
    try:
        workers = wait_for(
            lambda: http.get("/workers").json()["data"], 90, what="the local worker to register"
        )
        worker_pid = workers[0]["pid"]
    finally:
        server.kill()
        server.wait(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _alive(worker_pid):
        time.sleep(0.2)
    assert not _alive(worker_pid), "the worker outlived its killed serve"
    # A restarted serve runs exactly one worker (the orphan deregistered on its way out).
    server, http = start_serve(settings, "--workers", "1", "--device", "cpu")
    try:
        live = wait_for(
            lambda: http.get("/workers").json()["data"], 90, what="the new worker to register"
        )
        time.sleep(2)
        live = http.get("/workers").json()["data"]
        assert [w["pid"] for w in live if w["status"] != "offline"] != [worker_pid]
        assert len([w for w in live if _alive(w["pid"])]) == 1
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=90)


@pytest.mark.one_db
def test_a_worker_that_cannot_start_backs_off_says_why_and_stops(  # type: ignore[no-untyped-def]
    settings, tmp_path, tiny_model_dir, monkeypatch
) -> None:
    """vLLM is not installed in this environment: `serve --backend vllm` cannot start its
    worker. It retries with backoff, says why in GET /workers and in the waiting evaluation,
    and stops retrying after FORGETGUARD_WORKER_MAX_FAILED_STARTS failures."""
    monkeypatch.setenv("FORGETGUARD_WORKER_RESTART_BACKOFF_SECONDS", "0.5")
    monkeypatch.setenv("FORGETGUARD_WORKER_MAX_FAILED_STARTS", "3")
    log = tmp_path / "serve.log"
    server, http = start_serve(
        settings, "--workers", "1", "--device", "cpu", "--backend", "vllm", log=log
    )
    try:
        queued = http.post(
            "/evaluations",
            json={
                "model": {"path": str(tiny_model_dir), "backend": "vllm"},
                "suites": ["forgetting-checklist"],
            },
        )
        assert queued.status_code == 202, queued.text

        def slots(status: str) -> list[dict]:  # type: ignore[type-arg]
            return [w for w in http.get("/workers").json()["data"] if w["status"] == status]

        (failing,) = wait_for(lambda: slots("failing"), 120, what="a failed start to be listed")
        assert "No module named 'vllm'" in failing["error"], failing
        assert failing["backend"] == "vllm"
        (stopped,) = wait_for(lambda: slots("stopped"), 180, what="serve to stop restarting")
        assert "No module named 'vllm'" in stopped["error"]
        assert "stopped restarting it after 3 failed starts" in stopped["error"]
        starts = log.read_text().count("failed to start")
        time.sleep(5)
        assert log.read_text().count("failed to start") == starts == 3  # no more tries
        body = http.get(f"/evaluations/{queued.json()['id']}").json()
        assert body["status"] == "queued"
        assert body["error"].startswith("no live worker for backend vllm: last start failed with")
        assert "No module named 'vllm'" in body["error"] and "make vllm" in body["error"]
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=90)
    assert code == 0
