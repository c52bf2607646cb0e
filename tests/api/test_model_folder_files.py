"""Files that never end, in a folder a client names (issue 29, part 1), against a real
``forgetguard serve``: a FIFO, a device or a 10 GB sparse file anywhere the loaders read is a
quick 422 naming the file, many such submissions at once block nothing, and ``/healthz``
keeps answering throughout."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.core.config import Settings
from tests.conftest import start_serve

TEN_GB = 10 * 1024**3


def _device(path: Path) -> None:
    """A character device at ``path`` (as root), else a link to /dev/zero (/dev is a root)."""
    path.unlink(missing_ok=True)
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 5))
    except PermissionError:
        path.symlink_to("/dev/zero")


def _fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def _sparse_safetensors(path: Path) -> None:
    """A safetensors file whose header is valid and whose 10 GB of weights were never written."""
    data = TEN_GB
    header = json.dumps({"w": {"dtype": "U8", "shape": [data], "data_offsets": [0, data]}})
    raw = header.encode() + b" " * (-len(header) % 8)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        handle.truncate(8 + len(raw) + data)


def _sparse(path: Path) -> None:
    path.unlink(missing_ok=True)
    with path.open("wb") as handle:
        handle.truncate(TEN_GB)


# case -> (how the model folder is spoiled, the name the refusal must give)
SPOILS: dict[str, tuple[Callable[[Path], None], str]] = {
    "fifo-weights": (lambda m: _fifo(m / "model.safetensors"), "model.safetensors"),
    "fifo-config": (lambda m: _fifo(m / "config.json"), "config.json"),
    "fifo-tokenizer": (lambda m: _fifo(m / "tokenizer.json"), "tokenizer.json"),
    "fifo-chat-template": (
        lambda m: (
            (m / "additional_chat_templates").mkdir()
            or _fifo(m / "additional_chat_templates" / "tool.jinja")
        ),
        "tool.jinja",
    ),
    "device-weights": (lambda m: _device(m / "model.safetensors"), "model.safetensors"),
    "device-tokenizer-config": (
        lambda m: _device(m / "tokenizer_config.json"),
        "tokenizer_config.json",
    ),
    "sparse-weights": (lambda m: _sparse_safetensors(m / "model.safetensors"), "model.safetensors"),
    "sparse-weights-no-header": (lambda m: _sparse(m / "model.safetensors"), "model.safetensors"),
    "sparse-tokenizer": (lambda m: _sparse(m / "tokenizer.json"), "tokenizer.json"),
    "sparse-extra-shard": (
        lambda m: _sparse_safetensors(m / "model-00002-of-00002.safetensors"),
        "model-00002-of-00002.safetensors",
    ),
}


@pytest.fixture
def served(settings: Settings, tmp_path: Path) -> Any:
    """A real ``forgetguard serve`` (no workers) whose model roots include /dev, so a link to a
    device is inside the roots and must be refused for what it is."""
    roots = [*settings.model_roots, Path("/dev")]
    (tmp_path / "models").mkdir(exist_ok=True)
    server, http = start_serve(
        settings.model_copy(update={"model_roots": roots}),
        "--workers",
        "0",
        log=tmp_path / "serve.log",
    )
    try:
        yield http
    finally:
        server.terminate()
        server.wait(timeout=60)
        http.close()


def _spoiled(tiny_model_dir: Path, tmp_path: Path, case: str) -> tuple[Path, str]:
    model = tmp_path / "models" / case
    shutil.copytree(tiny_model_dir, model)
    spoil, name = SPOILS[case]
    spoil(model)
    return model, name


def test_each_spoiled_folder_is_a_quick_422_naming_the_file(
    served: httpx.Client, tiny_model_dir: Path, tmp_path: Path
) -> None:
    for case in SPOILS:
        model, name = _spoiled(tiny_model_dir, tmp_path, case)
        started = time.monotonic()
        response = served.post(
            "/evaluations", json={"model": {"path": str(model)}, "suites": ["general-qa"]}
        )
        took = time.monotonic() - started
        assert response.status_code == 422, (case, response.text)
        assert name in response.json()["detail"], (case, response.text)
        assert took < 5, (case, took)
    assert served.get("/evaluations").json()["data"] == []


def test_a_fifo_as_dataset_or_adapter_is_refused(
    served: httpx.Client, tiny_model_dir: Path, tmp_path: Path, settings: Settings
) -> None:
    data = settings.data_roots[0] / "train.jsonl"
    os.mkfifo(data)
    response = served.post(
        "/finetune-jobs",
        json={"base_model": {"path": str(tiny_model_dir)}, "dataset": {"path": str(data)}},
    )
    assert response.status_code == 422 and "FIFO" in response.json()["detail"], response.text
    adapter = tmp_path / "models" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    os.mkfifo(adapter / "adapter_model.safetensors")
    response = served.post(
        "/evaluations",
        json={
            "model": {"path": str(tiny_model_dir), "adapter_path": str(adapter)},
            "suites": ["general-qa"],
        },
    )
    assert response.status_code == 422, response.text
    assert "adapter_model.safetensors" in response.json()["detail"]


async def _storm(base_url: str, models: list[str], posts_per_model: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as http:

        async def submit(model: str) -> tuple[int, float]:
            started = time.monotonic()
            response = await http.post(
                "/evaluations", json={"model": {"path": model}, "suites": ["general-qa"]}
            )
            return response.status_code, time.monotonic() - started

        async def health() -> list[float]:
            waits = []
            for _ in range(20):
                started = time.monotonic()
                response = await http.get("/healthz")
                assert response.status_code == 200
                waits.append(time.monotonic() - started)
                await asyncio.sleep(0.05)
            return waits

        posts = [submit(m) for m in models for _ in range(posts_per_model)]
        results = await asyncio.gather(health(), *posts)
    return {"health": results[0], "posts": results[1:]}


def test_many_such_submissions_at_once_block_nothing(
    served: httpx.Client, tiny_model_dir: Path, tmp_path: Path
) -> None:
    models = [str(_spoiled(tiny_model_dir, tmp_path, case)[0]) for case in SPOILS]
    # More submissions than the API has threads (40) or database slots.
    outcome = asyncio.run(_storm(str(served.base_url), models, posts_per_model=8))
    statuses = [status for status, _ in outcome["posts"]]
    assert statuses == [422] * len(statuses)
    assert max(took for _, took in outcome["posts"]) < 30
    assert max(outcome["health"]) < 5, outcome["health"]
    assert served.get("/healthz").json() == {"status": "ok", "database": "ok"}


def test_a_read_stuck_in_the_kernel_answers_at_the_deadline_and_holds_no_api_thread(
    settings: Settings, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that never returns (a hung network file system; nothing here can make one, so
    the folder inspection blocks on an event instead) is answered at the deadline, and while
    more such submissions are pending than the API has threads, other requests still run."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from app.evaluations import service
    from app.main import create_app
    from app.web import filework

    release = threading.Event()

    def stuck(**_kwargs: Any) -> Any:
        release.wait(60)
        raise AssertionError("released only after the test")

    monkeypatch.setattr(service, "inspect_model", stuck)
    monkeypatch.setattr(filework, "STUCK_READ_GRACE_SECONDS", 0.2)
    small = settings.model_copy(update={"api_threads": 8, "client_read_seconds": 1.0})
    body = {"model": {"path": str(tiny_model_dir)}, "suites": ["general-qa"]}
    with TestClient(create_app(small)) as client, ThreadPoolExecutor(24) as pool:
        started = time.monotonic()
        posts = [pool.submit(client.post, "/evaluations", json=body) for _ in range(20)]
        time.sleep(0.3)
        during = time.monotonic()
        assert client.get("/healthz").status_code == 200
        assert client.get("/evaluations").status_code == 200
        assert time.monotonic() - during < 1.0
        answers = [future.result(timeout=30) for future in posts]
        took = time.monotonic() - started
        release.set()
    assert [a.status_code for a in answers] == [422] * 20
    assert all("FORGETGUARD_CLIENT_READ_SECONDS" in a.json()["detail"] for a in answers)
    assert took < 10, took
