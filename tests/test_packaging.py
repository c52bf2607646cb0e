"""The installed package stands alone: a wheel (not an editable install) in a fresh virtual
environment without torch migrates a new SQLite file from an empty directory and serves the API.

Builds the wheel from a copy of the sources and installs its dependencies from the package index
(pip's cache makes a second run faster); about a minute.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from alembic.script import ScriptDirectory

from app.core.database import MIGRATIONS_DIR
from tests.conftest import REPO, free_port, run_checked, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SOURCES = ("pyproject.toml", "README.md", "app", "workers")


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without anything that points Python or forgetguard at the checkout."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "FORGETGUARD_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def test_wheel_without_extras_migrates_and_serves_without_torch(tmp_path: Path) -> None:
    started = time.monotonic()
    # A copy, so the build writes nothing into the checkout (and no stale build/ leaks in).
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(
                REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(REPO / name, source / name)
    pip = (sys.executable, "-m", "pip", "--disable-pip-version-check")
    run_checked(*pip, "wheel", "--no-deps", "-q", "-w", tmp_path / "dist", source, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("forgetguard-*.whl")

    # No system site packages and no pip of its own: this process's pip installs into it.
    venv = tmp_path / "venv"
    run_checked(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    run_checked(*pip, "--python", python, "install", "--quiet", wheel, timeout=600)

    empty = tmp_path / "empty"
    empty.mkdir()
    env = _clean_env(FORGETGUARD_DATABASE_URL="sqlite:///./x.db")
    where = run_checked(python, "-c", "import app; print(app.__file__)", cwd=empty, env=env)
    assert Path(where.strip()).is_relative_to(venv), where  # the wheel's copy, not the checkout's
    no_torch = subprocess.run(
        [python, "-c", "import torch"], cwd=empty, env=env, capture_output=True, check=False
    )
    assert no_torch.returncode != 0 and b"No module named 'torch'" in no_torch.stderr

    forgetguard = venv / "bin" / "forgetguard"
    assert "database at head" in run_checked(forgetguard, "db", "upgrade", cwd=empty, env=env)
    with sqlite3.connect(empty / "x.db") as db:
        (version,) = db.execute("SELECT version_num FROM alembic_version").fetchone()
    assert version == ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()

    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [forgetguard, "serve", "--workers", "0", "--port", str(port)],
            cwd=empty,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:

            def healthy() -> httpx.Response | None:
                assert server.poll() is None, log.read_text()[-4000:]
                try:
                    response = http.get("/healthz")
                except httpx.TransportError:
                    return None
                return response if response.status_code == 200 else None

            health = wait_for(healthy, 60, what="/healthz from the installed package")
            assert health.json() == {"status": "ok", "database": "ok"}
            assert http.get("/suites").status_code == 200
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
    assert code == 0, log.read_text()[-4000:]
    print(f"wheel, venv, install, migrate and serve: {time.monotonic() - started:.0f} s")
