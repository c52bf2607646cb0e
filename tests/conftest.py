"""Shared fixtures: a fresh database per test (SQLite, and PostgreSQL where it runs), settings,
an API client, a tiny model built on the fly, and the real reference model."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from app.core.config import Settings
from app.core.database import upgrade
from workers.engine.process import configure_process

# As `forgetguard worker` does, before anything loads torch: tests load models in-process.
configure_process()

REPO = Path(__file__).resolve().parent.parent
PG_URL = os.environ.get(
    "FORGETGUARD_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _postgres_available() -> bool:
    try:
        engine = create_engine(PG_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
        return True
    except Exception:
        return False


POSTGRES_UP = _postgres_available()


def _backends() -> list[str]:
    choice = os.environ.get("FORGETGUARD_TEST_DB", "both")
    return ["sqlite", "postgres"] if choice == "both" else [choice]


def require_postgres() -> None:
    """Skip (outside CI) or fail (in CI) when PostgreSQL is not reachable."""
    if POSTGRES_UP:
        return
    if IN_CI:
        pytest.fail(f"PostgreSQL is not reachable at {PG_URL}; CI must run the PostgreSQL tests")
    pytest.skip(f"PostgreSQL is not reachable at {PG_URL}; start it to run this test")


def _vllm_missing() -> str | None:
    """Why the vLLM tests cannot run here (None: they can)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed in this environment; `make vllm` builds .venv-vllm"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``one_db`` (slow end-to-end runs) use only the first backend; tests marked
    ``vllm`` are skipped where vLLM is not installed, unless FORGETGUARD_REQUIRE_VLLM=1 (CI's
    vLLM step), where that is a failure instead."""
    vllm_missing = _vllm_missing()
    if vllm_missing and os.environ.get("FORGETGUARD_REQUIRE_VLLM") != "1":
        for item in items:
            if item.get_closest_marker("vllm"):
                item.add_marker(pytest.mark.skip(reason=vllm_missing))
    first = _backends()[0]
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        backend = callspec.params.get("database_url") if callspec else None
        if item.get_closest_marker("one_db") and backend not in (None, first):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(params=_backends())
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database: a SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'forgetguard.db'}"
        upgrade(url)
        yield url
        return
    require_postgres()
    schema = f"fg_{secrets.token_hex(6)}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    sep = "&" if "?" in PG_URL else "?"
    url = f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    upgrade(url)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a trained tokenizer and a chat template (seconds to build)."""
    from tests.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def reference_model_dir() -> Path:
    """The real SmolLM2-135M-Instruct in ./models, pulled on first use."""
    from workers.reference import pull

    return pull("smollm2-135m-instruct", REPO / "models")


@pytest.fixture(scope="session")
def vllm_env() -> None:
    """vLLM's CPU settings for this 2-core, shared machine (a run may set its own)."""
    missing = _vllm_missing()
    if missing:  # only reached with FORGETGUARD_REQUIRE_VLLM=1
        pytest.fail(missing)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch on one thread for the test: with tiny tensors, more threads only add contention."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def settings(database_url: str, tmp_path: Path, tiny_model_dir: Path) -> Settings:
    """Settings for one test: its own database, roots that hold the test models, short leases."""
    (tmp_path / "data").mkdir(exist_ok=True)
    return Settings(
        database_url=database_url,
        model_roots=[tiny_model_dir.parent, REPO / "models", tmp_path / "models"],
        data_roots=[tmp_path / "data"],
        artifacts_dir=tmp_path / "artifacts",
        cache_dir=tmp_path / "cache",
        benchmarks_dir=tmp_path / "benchmarks",
        lease_seconds=60,
        heartbeat_seconds=2,
        poll_seconds=0.2,
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[object]:
    """A TestClient on a fresh app and database."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(settings)) as test_client:
        yield test_client


def settings_env(settings: Settings) -> dict[str, str]:
    """Environment variables that reproduce ``settings`` in a subprocess."""
    env = dict(os.environ)
    env.update(
        {
            "FORGETGUARD_DATABASE_URL": settings.database_url,
            "FORGETGUARD_MODEL_ROOTS": ",".join(str(p) for p in settings.model_roots),
            "FORGETGUARD_DATA_ROOTS": ",".join(str(p) for p in settings.data_roots),
            "FORGETGUARD_ARTIFACTS_DIR": str(settings.artifacts_dir),
            "FORGETGUARD_CACHE_DIR": str(settings.cache_dir),
            "FORGETGUARD_LEASE_SECONDS": str(settings.lease_seconds),
            "FORGETGUARD_HEARTBEAT_SECONDS": str(settings.heartbeat_seconds),
            "FORGETGUARD_POLL_SECONDS": str(settings.poll_seconds),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def _spawn(
    settings: Settings, args: list[str], log: Path | None, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """``forgetguard <args>`` in a child process, its output appended to ``log`` (or dropped).

    ``env``: more environment variables for the child, beside the settings'."""
    command = [sys.executable, "-m", "app.cli", *args]
    child_env = {**settings_env(settings), **(env or {})}
    if log is None:
        return subprocess.Popen(command, env=child_env, cwd=REPO, stdout=subprocess.DEVNULL)
    with log.open("ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            command, env=child_env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT
        )


def start_worker(
    settings: Settings, *extra: str, log: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """A real ``forgetguard worker`` process on the CPU (``env``: more environment variables)."""
    return _spawn(settings, ["worker", "--device", "cpu", *extra], log, env)


def free_port() -> int:
    """A TCP port nobody listens on right now, on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_serve(
    settings: Settings, *extra: str, log: Path | None = None
) -> tuple[subprocess.Popen[bytes], httpx.Client]:
    """A real ``forgetguard serve`` on a free loopback port, answering /healthz; and a client.

    ``extra``: more command-line options (``--workers 1 --device cpu``). The caller stops it.
    """
    port = free_port()
    server = _spawn(settings, ["serve", "--port", str(port), *extra], log)
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)

    def healthy() -> bool:
        if server.poll() is not None:
            pytest.fail(f"forgetguard serve exited with {server.returncode} before answering")
        try:
            return http.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    wait_for(healthy, 60, what="the server to answer /healthz")
    return server, http


def run_checked(
    *command: str | Path, cwd: Path = REPO, env: dict[str, str] | None = None, timeout: float = 300
) -> str:
    """Run ``command``; fail the test with its stderr unless it exits 0; return its stdout."""
    proc = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{command}: exit {proc.returncode}\n{proc.stderr[-4000:]}"
    return proc.stdout


def qa_suite(name: str, size: int) -> dict[str, Any]:
    """An inline qa suite of ``size`` arithmetic questions in two categories."""
    return {
        "name": name,
        "kind": "qa",
        "items": [
            {
                "id": f"{name}-{i:03d}",
                "question": f"What is {i} plus {i}?",
                "answers": [str(2 * i)],
                "category": ("even", "odd")[i % 2],
            }
            for i in range(size)
        ],
    }


def wait_for(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns a truthy value; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")
