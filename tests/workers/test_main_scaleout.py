"""Scale-out: many workers on one PostgreSQL database, one process per GPU, the model kept
loaded across jobs, and the deployment files (docker/) that put it on many hosts."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from datetime import timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from packaging.requirements import Requirement
from sqlalchemy import select

from app.core.config import Settings
from app.core.database import make_engine, session_factory
from app.core.tables import Claim, Evaluation
from app.main import create_app
from tests.conftest import REPO, qa_suite, run_checked, start_worker, wait_for

DOCKER = REPO / "docker"
# Everything that only a worker may import (the API image carries none of it).
WORKER_ONLY = (
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "safetensors",
    "tokenizers",
    "gguf",
    "bitsandbytes",
)
STARTUP_TIMEOUT = 180.0  # two workers importing torch on a busy 2-core machine


# --------------------------------------------------------------------------- many workers


@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_two_workers_on_postgres_run_evaluations_at_overlapping_times(
    settings: Settings, tiny_model_dir: Path, tmp_path: Path
) -> None:
    logs = [tmp_path / "worker-a.log", tmp_path / "worker-b.log"]
    workers = [start_worker(settings, "--kinds", "evaluation", log=log) for log in logs]
    engine = make_engine(settings.database_url)
    try:
        with TestClient(create_app(settings)) as client:
            wait_for(
                lambda: len(client.get("/workers").json()["data"]) == 2,
                STARTUP_TIMEOUT,
                what="both workers to register",
            )
            ids = []
            for index in range(4):
                response = client.post(
                    "/evaluations",
                    json={
                        "model": {"path": str(tiny_model_dir)},
                        "suites": [qa_suite("first", 48), qa_suite("second", 32)],
                        "prompt_format": "plain",
                        "generation": {"max_new_tokens": 32},
                        "label": f"overlap-{index}",
                        "cache": False,
                    },
                )
                assert response.status_code == 202, response.text
                ids.append(response.json()["id"])

            def both_busy() -> list[dict[str, Any]] | None:
                listed = client.get("/workers").json()["data"]
                busy = [w for w in listed if w["current_job"]]
                return listed if len(busy) == 2 else None

            listed = wait_for(
                both_busy,
                STARTUP_TIMEOUT,
                interval=0.1,
                what="GET /workers to show both workers on a job",
            )
            assert {w["current_job"]["id"] for w in listed} <= set(ids)
            assert {w["current_job"]["kind"] for w in listed} == {"evaluation"}
            assert len({w["id"] for w in listed}) == 2
            for w in listed:
                assert w["host"] and w["device"] == "cpu" and w["status"] == "busy"
                assert w["last_heartbeat"] and w["pid"] > 0

            def all_done() -> bool:
                rows = [client.get(f"/evaluations/{i}").json()["status"] for i in ids]
                assert "failed" not in rows
                return all(status == "succeeded" for status in rows)

            wait_for(all_done, STARTUP_TIMEOUT, what="the four evaluations to succeed")
            assert {w["status"] for w in client.get("/workers").json()["data"]} == {"idle"}
    finally:
        for proc in workers:
            proc.terminate()
        for proc in workers:
            proc.wait(timeout=60)

    with session_factory(engine)() as session:
        rows = {
            r.id: r
            for r in session.execute(select(Evaluation).where(Evaluation.id.in_(ids))).scalars()
        }
        holders = {c.job_id: c.worker_id for c in session.execute(select(Claim)).scalars()}
    engine.dispose()
    assert len(set(holders.values())) == 2, "one worker ran everything"
    # Some pair of evaluations, run by different workers, ran at overlapping times.
    overlapping = [
        (a, b)
        for a in ids
        for b in ids
        if holders[a] != holders[b]
        and max(rows[a].started_at, rows[b].started_at)
        < min(rows[a].finished_at, rows[b].finished_at)
    ]
    assert overlapping, {i: (rows[i].started_at, rows[i].finished_at, holders[i]) for i in ids}
    # The model stayed loaded: each worker loaded it once, whatever number of jobs it ran.
    loads = [log.read_text().count("loading ") for log in logs]
    assert loads == [1, 1], loads


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_leases_run_on_the_database_clock_so_a_skewed_host_cannot_take_a_live_job(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.jobs import queue

    engine = make_engine(settings.database_url)
    try:
        with session_factory(engine)() as session:
            session.add(Evaluation(id="ev_skew", model_path="m", generation={}, suites=[]))
            session.commit()
        held = queue.claim(engine, worker_id="host-a", kinds=("evaluation",), lease_seconds=30)
        assert held is not None
        # Host B's clock runs ten minutes fast: by its own clock, A's lease ran out long ago.
        fast = queue.utcnow() + timedelta(minutes=10)
        monkeypatch.setattr(queue, "utcnow", lambda: fast)
        assert (
            queue.claim(engine, worker_id="host-b", kinds=("evaluation",), lease_seconds=30) is None
        )
        queue.heartbeat(engine, held, 30)  # A still holds it
    finally:
        engine.dispose()


def test_model_cache_keeps_one_model_loaded_across_jobs(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    import torch

    from tests.tiny_model import build_tiny_model
    from workers.engine.loading import ModelCache

    other = build_tiny_model(tmp_path / "models" / "other", seed=1)
    settings = Settings(
        model_roots=[tiny_model_dir.parent, other.parent], cache_dir=tmp_path / "cache"
    )
    cache = ModelCache(settings, torch.device("cpu"))
    first = cache.get(str(tiny_model_dir), None)
    assert not first.base_reused
    same = cache.get(str(tiny_model_dir), None)
    assert same.model is first.model and same.base_reused  # same fingerprint: not loaded again
    switched = cache.get(str(other), None)
    assert switched.model is not first.model and switched.fingerprint != first.fingerprint
    again = cache.get(str(tiny_model_dir), None)
    assert again.model is not first.model and again.fingerprint == first.fingerprint
    assert not again.base_reused and cache.base_loads == 3  # one model at a time


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_worker_rides_out_a_database_outage_instead_of_exiting(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy.exc import OperationalError

    import workers.main as worker_main

    worker = worker_main.Worker(
        settings.model_copy(update={"poll_seconds": 0.01}), device="cpu", kinds=("evaluation",)
    )
    calls = []

    def flaky_claim(*_args: Any, **_kwargs: Any) -> None:
        calls.append(1)
        if len(calls) <= 3:  # PostgreSQL restarting, a failover, a dropped connection
            raise OperationalError("SELECT 1", {}, Exception("connection refused"))
        worker.stop.set()
        return None

    monkeypatch.setattr(worker_main, "claim", flaky_claim)
    assert worker.run() == 0
    assert len(calls) == 4  # retried with backoff, then carried on


# --------------------------------------------------------------------------- one process per GPU

STUB_WORKER = """
import json, os, sys, types
stub = types.ModuleType("workers.main")
def main(settings, **options):
    names = ("CUDA_VISIBLE_DEVICES", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "OMP_WAIT_POLICY")
    print(json.dumps({**{n: os.environ.get(n) for n in names},
                      "torch_imported": "torch" in sys.modules, **options}))
    return 0
stub.main = main
sys.modules["workers.main"] = stub
from app.cli import main as cli
sys.argv = ["forgetguard", "worker", *sys.argv[1:]]
cli()
"""


def test_worker_device_pins_one_gpu_before_torch_is_imported() -> None:
    settings = ("CUDA_VISIBLE_DEVICES", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "OMP_WAIT_POLICY")
    env = {k: v for k, v in os.environ.items() if k not in settings}
    out = run_checked(
        sys.executable, "-c", STUB_WORKER, "--device", "cuda:3", "--kinds", "evaluation", env=env
    )
    seen = json.loads(out.strip().splitlines()[-1])
    # The process sees only GPU 3, as its cuda:0, and torch had not been imported yet.
    assert seen["CUDA_VISIBLE_DEVICES"] == "3" and seen["device"] == "cuda:0"
    assert seen["torch_imported"] is False
    assert seen["kinds"] == ["evaluation"]
    # The command made the process offline and its idle threads passive, before torch loads.
    assert seen["HF_HUB_OFFLINE"] == seen["TRANSFORMERS_OFFLINE"] == "1"
    assert seen["OMP_WAIT_POLICY"] == "PASSIVE"


def test_serve_starts_one_fresh_worker_process_per_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from app import cli

    started: list[list[str]] = []
    envs: list[dict[str, str]] = []

    class FakePopen:
        stderr = None

        def __init__(self, cmd: list[str], env: dict[str, str], **_kwargs: Any) -> None:
            started.append(cmd)
            envs.append(env)

        def poll(self) -> int | None:
            return None

    monkeypatch.setattr(cli.subprocess, "Popen", FakePopen)
    supervisor = cli._Supervisor(3, "cuda", grace=1)
    supervisor.procs = [supervisor._spawn(i) for i in range(3)]  # type: ignore[misc]
    # A new interpreter per worker (spawn, never fork: CUDA cannot survive a fork), each
    # pinned to its own GPU.
    assert all(cmd[:4] == [sys.executable, "-m", "app.cli", "worker"] for cmd in started)
    devices = [cmd[cmd.index("--device") + 1] for cmd in started]
    assert devices == ["cuda:0", "cuda:1", "cuda:2"]
    # Each worker knows its supervisor, so it stops when serve dies (even by SIGKILL).
    assert all(env["FORGETGUARD_PARENT_PID"] == str(os.getpid()) for env in envs)


# --------------------------------------------------------------------------- docker/


def _compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "compose.yml").read_text())  # type: ignore[no-any-return]


def _docker_compose_available() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=60)
    return probe.returncode == 0


def test_docker_compose_config_accepts_the_file() -> None:
    if not _docker_compose_available():
        pytest.skip("`docker compose` (the compose v2 plugin) is not installed here")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FORGETGUARD_", "POSTGRES_"))}
    result = subprocess.run(
        ["docker", "compose", "-f", str(DOCKER / "compose.yml"), "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    worker = config["services"]["worker"]
    device = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["count"] == 1
    assert config["services"]["api"]["environment"]["FORGETGUARD_DATABASE_URL"].startswith(
        "postgresql+psycopg://"
    )


def test_compose_file_runs_postgres_api_and_scalable_gpu_workers() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"postgres", "api", "worker"}
    postgres = services["postgres"]
    assert postgres["healthcheck"]["test"]
    volume = postgres["volumes"][0].split(":")[0]
    assert volume in compose["volumes"]  # a named volume, not a host path

    api = services["api"]
    command = " ".join(api["command"])
    assert command.index("forgetguard db upgrade") < command.index("forgetguard serve")
    assert "--workers 0" in command and "--host 0.0.0.0" in command
    assert "FORGETGUARD_API_KEYS" in api["environment"]
    assert api["depends_on"]["postgres"]["condition"] == "service_healthy"

    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker  # --scale worker=N
    device = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    assert any(v.endswith(":/models:ro") for v in worker["volumes"])
    assert any(v.endswith(":/models:ro") for v in api["volumes"])
    # Docker must wait longer than the worker's own shutdown bound before SIGKILL.
    grace = int(re.sub(r"\D", "", worker["stop_grace_period"]))
    assert grace > Settings().shutdown_grace_seconds


def _pip_install_targets(dockerfile: Path) -> list[str]:
    """The arguments of every ``pip install`` in a Dockerfile (line continuations joined)."""
    text = dockerfile.read_text().replace("\\\n", " ")
    targets = []
    for match in re.finditer(r"pip install ([^&\n]+)", text):
        targets += [t.strip("\"'") for t in match.group(1).split() if not t.startswith("-")]
    return targets


def _requirement_closure(names: list[str]) -> set[str]:
    """Installed distributions reachable from ``names`` through their (unconditional) requires."""
    seen: set[str] = set()
    todo = [Requirement(n) for n in names]
    while todo:
        req = todo.pop()
        name = req.name.lower().replace("_", "-")
        if name in seen or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        try:
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [
            r
            for r in map(Requirement, requires)
            if not r.marker or r.marker.evaluate({"extra": ""})
        ]
    return seen


def test_api_image_requirements_exclude_torch() -> None:
    targets = _pip_install_targets(DOCKER / "api.Dockerfile")
    assert targets == [".[postgres]"], targets
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    direct = [*project["dependencies"], *project["optional-dependencies"]["postgres"]]
    names = {Requirement(r).name.lower() for r in direct}
    assert not names & set(WORKER_ONLY), names & set(WORKER_ONLY)
    # Nor anything those pull in, as installed here.
    closure = _requirement_closure(direct)
    assert "fastapi" in closure and "psycopg" in closure
    assert not closure & set(WORKER_ONLY), closure & set(WORKER_ONLY)


def test_worker_image_installs_the_cuda_build_of_torch_first() -> None:
    text = (DOCKER / "worker.Dockerfile").read_text()
    assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:12\.\d+(\.\d+)?-[\w-]*runtime-ubuntu", text)
    assert "ARG TORCH_VERSION=2.13.0" in text
    assert re.search(r"TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cu12\d", text)
    targets = _pip_install_targets(DOCKER / "worker.Dockerfile")
    project = ".[worker,postgres,qlora,deepspeed]"  # QLoRA and DeepSpeed groups run on GPUs
    assert targets.index("torch==${TORCH_VERSION}") < targets.index(project)
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert {"worker", "postgres", "qlora", "deepspeed"} <= set(extras)
    assert "torch==2.13.0" in extras["worker"]  # the image's build arg and the project agree


API_WITHOUT_TORCH = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # any import of these raises ImportError
from fastapi.testclient import TestClient
from app.core.config import Settings
from app.core.database import upgrade
from app.main import create_app
import app.cli  # the `serve` command's module too

url = sys.argv[1]
upgrade(url)
with TestClient(create_app(Settings(database_url=url))) as client:
    for path in ("/healthz", "/workers", "/metrics", "/suites", "/evaluations"):
        response = client.get(path)
        assert response.status_code == 200, (path, response.status_code, response.text)
assert not any(sys.modules.get(name) for name in {blocked!r})
print("ok")
"""


def test_api_runs_with_torch_imports_blocked(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'api.db'}"
    result = subprocess.run(
        [sys.executable, "-c", API_WITHOUT_TORCH.format(blocked=WORKER_ONLY), url],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
