"""Process settings live at the edges: importing the code changes no environment variable, and
``configure_process`` (called by the entry points) sets them."""

from __future__ import annotations

import json
import os
import sys

from tests.conftest import REPO, run_checked
from workers.engine.process import configure_process

SETTINGS = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HUB_DISABLE_PROGRESS_BARS",
    "OMP_WAIT_POLICY",
    "CUDA_VISIBLE_DEVICES",
    "VLLM_CONFIGURE_LOGGING",
    "VLLM_ENABLE_V1_MULTIPROCESSING",
)

IMPORT_EVERYTHING = """
import importlib, json, os, pkgutil
before = dict(os.environ)
import app, workers
for package in (app, workers):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if module.name != "app.migrations.env":  # Alembic runs it; importing it migrates
            try:
                importlib.import_module(module.name)
            except ModuleNotFoundError as exc:  # an optional engine (vllm) not installed here
                if exc.name.split(".")[0] in ("app", "workers"):
                    raise
after = dict(os.environ)
print(json.dumps(sorted(k for k in {**before, **after} if before.get(k) != after.get(k))))
"""


def test_importing_every_module_leaves_the_environment_alone() -> None:
    # The test process itself is configured (conftest); the child starts without the settings.
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env["PYTHONPATH"] = str(REPO)
    out = run_checked(sys.executable, "-c", IMPORT_EVERYTHING, env=env)
    assert json.loads(out.splitlines()[-1]) == []


def test_configure_process_sets_offline_and_passive_threads() -> None:
    env: dict[str, str] = {}
    assert configure_process("cpu", environ=env) == "cpu"
    assert env == {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "VLLM_CONFIGURE_LOGGING": "0",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }


def test_configure_process_keeps_what_the_operator_set() -> None:
    env = {"OMP_WAIT_POLICY": "ACTIVE", "HF_HUB_OFFLINE": "0"}
    configure_process("auto", environ=env)
    assert env["OMP_WAIT_POLICY"] == "ACTIVE"
    assert env["HF_HUB_OFFLINE"] == "0"
    assert env["TRANSFORMERS_OFFLINE"] == "1"


def test_configure_process_pins_one_gpu() -> None:
    env = {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    assert configure_process("cuda:2", environ=env) == "cuda:0"
    assert env["CUDA_VISIBLE_DEVICES"] == "2"
    assert configure_process("cuda", environ=env) == "cuda"
    assert env["CUDA_VISIBLE_DEVICES"] == "2"
