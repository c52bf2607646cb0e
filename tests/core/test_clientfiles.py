"""Reading a client's file (app/core/clientfiles.py): regular files only, no holes, within a
budget, before a deadline; refusals name the file and come at once, without opening a FIFO."""

from __future__ import annotations

import os
import socket
import stat
import time
from pathlib import Path

import pytest

from app.core.clientfiles import (
    ReadBudget,
    hash_client_file,
    open_client_file,
    read_client_file,
    read_client_json,
)
from app.core.errors import Problem

TEN_GB = 10 * 1024**3


def _refused(path: Path, budget: ReadBudget | None = None) -> Problem:
    started = time.monotonic()
    with pytest.raises(Problem) as caught:
        read_client_file(path, "shown/name", budget or ReadBudget())
    assert time.monotonic() - started < 1.0
    assert caught.value.status == 422 and "shown/name" in caught.value.detail
    return caught.value


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert "FIFO" in _refused(fifo).detail
    with pytest.raises(Problem, match="FIFO"):
        hash_client_file(fifo, "shown/name", ReadBudget())


def test_a_device_is_refused(tmp_path: Path) -> None:
    assert "character device" in _refused(Path("/dev/zero")).detail
    if os.geteuid() == 0:
        device = tmp_path / "zero"
        os.mknod(device, stat.S_IFCHR | 0o600, os.makedev(1, 5))
        assert "character device" in _refused(device).detail


def test_a_socket_and_a_directory_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "s"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    try:
        assert "socket" in _refused(path).detail
    finally:
        server.close()
    assert "directory" in _refused(tmp_path).detail


def test_a_sparse_file_is_refused_even_without_a_size_budget(tmp_path: Path) -> None:
    sparse = tmp_path / "model.safetensors"
    with sparse.open("wb") as handle:
        handle.write(b"x" * 4096)
        handle.truncate(TEN_GB)
    started = time.monotonic()
    with pytest.raises(Problem) as caught:
        hash_client_file(sparse, "m/model.safetensors", ReadBudget())
    assert time.monotonic() - started < 1.0
    assert caught.value.title == "Sparse file refused"
    assert "m/model.safetensors" in caught.value.detail


def test_a_file_over_its_budget_is_refused_from_its_size(tmp_path: Path) -> None:
    big = tmp_path / "tokenizer.json"
    big.write_bytes(b"{" + b" " * 2000 + b"}")
    problem = _refused(big, ReadBudget(max_file_bytes=1000))
    assert (
        problem.title == "File too large" and "FORGETGUARD_MAX_MODEL_FILE_BYTES" in problem.detail
    )
    assert read_client_json(big, "t", ReadBudget(max_file_bytes=4096)) == {}


def test_reads_stop_at_the_deadline(tmp_path: Path) -> None:
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(3 << 20))
    budget = ReadBudget(seconds=0.05)
    time.sleep(0.1)
    with pytest.raises(Problem) as caught:
        hash_client_file(data, "d/data.bin", budget)
    assert caught.value.title == "File too slow to read"
    assert "FORGETGUARD_CLIENT_READ_SECONDS" in caught.value.detail


def test_a_regular_file_reads_whole_and_hashes_like_hashlib(tmp_path: Path) -> None:
    import hashlib

    content = os.urandom((1 << 20) * 2 + 17)
    path = tmp_path / "w.safetensors"
    path.write_bytes(content)
    assert read_client_file(path, "w", ReadBudget(), max_bytes=len(content)) == content
    assert hash_client_file(path, "w", ReadBudget()) == hashlib.sha256(content).hexdigest()
    with open_client_file(path, "w", ReadBudget(), max_bytes=None) as handle:
        assert handle.read(8) == content[:8] and handle.size == len(content)
