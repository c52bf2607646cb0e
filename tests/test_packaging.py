"""The installed packages stand alone.

- The server: a wheel (not an editable install) in a fresh virtual environment without torch
  migrates a new SQLite file from an empty directory and serves the API.
- The client: ``pip install ./client`` (the ``forgetguard-client`` distribution) in a fresh
  virtual environment has no fastapi, sqlalchemy, uvicorn or torch; its ``forgetguard gate``
  shows its help and gates two evaluations on a real server.

Each builds from a copy of the sources and installs its dependencies from the package index
(pip's cache makes a second run faster); about a minute each.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic.script import ScriptDirectory

from app.core.database import MIGRATIONS_DIR
from tests.conftest import REPO, free_port, run_checked, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SOURCES = ("pyproject.toml", "README.md", "app", "workers", "forgetguard")
CLIENT_SOURCES = ("client", "forgetguard")
SERVER_SIDE = ("fastapi", "sqlalchemy", "uvicorn", "alembic", "torch", "transformers", "app")


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without anything that points Python or forgetguard at the checkout."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "FORGETGUARD_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def _copy(names: tuple[str, ...], source: Path) -> None:
    """A copy of the sources, so a build writes nothing into the checkout (no stale build/)."""
    source.mkdir()
    for name in names:
        if (REPO / name).is_dir():
            shutil.copytree(
                REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "build")
            )
        else:
            shutil.copy2(REPO / name, source / name)


PIP = (sys.executable, "-m", "pip", "--disable-pip-version-check")


def test_wheel_without_extras_migrates_and_serves_without_torch(tmp_path: Path) -> None:
    started = time.monotonic()
    source = tmp_path / "source"
    _copy(SOURCES, source)
    pip = PIP
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


@pytest.mark.one_db
def test_the_client_alone_installs_and_gates_without_the_server(
    tmp_path: Path, client: Any, settings: Any, tiny_model_dir: Path
) -> None:
    from app.main import create_app
    from tests.forgetguard.gate.test_run import finish, submit
    from tests.ui.live import serve

    started = time.monotonic()
    source = tmp_path / "source"
    _copy(CLIENT_SOURCES, source)
    venv = tmp_path / "venv"
    run_checked(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    run_checked(*PIP, "--python", python, "install", "--quiet", source / "client", timeout=600)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = _clean_env()

    installed = run_checked(
        python,
        "-c",
        "import importlib.util as u, forgetguard\n"
        f"print(forgetguard.__file__, [n for n in {SERVER_SIDE!r} if u.find_spec(n)])",
        cwd=empty,
        env=env,
    )
    where, found = installed.strip().split(" ", 1)
    assert Path(where).is_relative_to(venv) and found == "[]", installed

    forgetguard = venv / "bin" / "forgetguard"
    help_text = run_checked(forgetguard, "gate", "--help", cwd=empty, env=env)
    assert "--max-category-drop" in help_text and "--timeout" in help_text
    # Nothing of the server was imported on the way (it is not even installed).
    loaded = run_checked(
        python,
        "-c",
        "import sys\nsys.argv = ['forgetguard', 'gate', '--help']\n"
        "from forgetguard.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {SERVER_SIDE!r}))",
        cwd=empty,
        env=env,
    )
    assert loaded.strip().splitlines()[-1] == "[]"

    before, after = submit(client, tiny_model_dir), submit(client, tiny_model_dir)
    finish(client, before)
    finish(client, after, wrong={f"q{i}" for i in range(10, 20)})
    with serve(create_app(settings)) as server:
        codes = []
        for pair in ((before, before), (before, after)):
            gate = subprocess.run(
                [forgetguard, "gate", "--server", server, "--before", pair[0], "--after", pair[1]],
                cwd=empty,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            codes.append(gate.returncode)
            assert "Traceback" not in gate.stderr, gate.stderr
    assert codes == [0, 1]
    print(f"client venv, install, help and two gates: {time.monotonic() - started:.0f} s")


def test_the_images_copy_every_package_they_import() -> None:
    """app imports the client package (status names, the rule book, the client's commands):
    both images must copy it, or the installed `forgetguard` fails at its first import."""
    docker = REPO / "docker"
    for image, packages in (("api", ("app", "forgetguard")), ("worker", SOURCES[2:])):
        copied = re.findall(
            r"^COPY (\S+) \./\1$", (docker / f"{image}.Dockerfile").read_text(), re.M
        )
        assert set(packages) <= set(copied), (image, copied)
