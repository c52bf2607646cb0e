"""Reading a file a client named: a regular file, within a size budget, before a deadline.

Everything the API or a worker reads on a client's behalf (a model folder's config, tokenizer
and template files, safetensors headers, weight hashes for fingerprints, dataset files) goes
through here, because the client chose what lies at that path:

- only a **regular file** is opened: a FIFO would block ``open`` until someone writes to it,
  a device (``/dev/zero``) never ends, a socket cannot be read; they are refused by type, from
  ``stat``, before anything is opened, and again on the opened descriptor (the path may have
  been swapped in between);
- a file **with holes** (a sparse file: ``truncate -s 10G``) is refused: it claims gigabytes it
  does not hold, and reading or hashing them would take as long as real data;
- a file larger than its **budget** is refused from its size, and reading stops at the budget
  even if the file grows meanwhile;
- reads run in chunks against a **deadline** (``FORGETGUARD_CLIENT_READ_SECONDS`` for one
  request's files), so a slow file system cannot hold a request or a job indefinitely.

Every refusal is a 422 problem naming the file as the client sees it (``shown``), never the
resolved path. No torch here: the API imports this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from app.core.errors import Problem

# Defaults of FORGETGUARD_CLIENT_READ_SECONDS and FORGETGUARD_MAX_MODEL_FILE_BYTES
# (app.core.config): how long one request (or one job step) may spend reading a client's files,
# first hashes of its weights included; and the largest config, tokenizer or template file
# read from a model folder (tokenizer.json of the largest vocabularies is some 30 MB).
DEFAULT_READ_SECONDS = 120.0
DEFAULT_MAX_FILE_BYTES = 64 * 1024 * 1024
READ_SECONDS_SETTING = "FORGETGUARD_CLIENT_READ_SECONDS"
MAX_FILE_BYTES_SETTING = "FORGETGUARD_MAX_MODEL_FILE_BYTES"
CHUNK_BYTES = 1 << 20
# Files this small are never refused for holes (a hole costs nothing to read there).
SPARSE_CHECK_FROM_BYTES = 1 << 20

_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


class ReadBudget:
    """What one request (or one step of a job) may read of a client's files: metadata files
    (configs, tokenizers, templates) up to ``max_file_bytes`` each, and everything together
    before a deadline ``seconds`` from its creation (monotonic clock)."""

    def __init__(
        self, *, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, seconds: float = DEFAULT_READ_SECONDS
    ) -> None:
        self.max_file_bytes = max_file_bytes
        self.seconds = seconds
        self.until = time.monotonic() + seconds

    def remaining(self) -> float:
        """Seconds left (negative once past)."""
        return self.until - time.monotonic()

    def check(self, shown: str) -> None:
        """Refuse (422) once the deadline has passed, naming the file being read."""
        if self.remaining() < 0:
            raise Problem(
                422,
                "File too slow to read",
                f"reading {shown} took longer than {self.seconds:g} s; the file system holding "
                f"it is too slow or the file never ends (the operator sets "
                f"{READ_SECONDS_SETTING})",
            )


def not_regular(mode: int) -> str | None:
    """What a file of ``mode`` is when it is not a regular file (None for a regular file)."""
    if stat.S_ISREG(mode):
        return None
    for test, kind in _KINDS:
        if test(mode):
            return kind
    return "not a regular file"


def refuse_kind(shown: str, kind: str) -> Problem:
    """The refusal of a client file that is not a regular file."""
    return Problem(
        422,
        "Not a regular file",
        f"{shown} is {kind}; forgetguard reads only regular files from a client's folders",
    )


def _unreadable(shown: str, exc: OSError) -> Problem:
    # strerror only: str(exc) names the resolved path, which the client need not see.
    return Problem(422, "Unreadable file", f"{shown} cannot be read: {exc.strerror or 'I/O error'}")


def _too_large(shown: str, size: int | str, max_bytes: int, setting: str | None) -> Problem:
    where = f" (the operator sets {setting})" if setting else ""
    return Problem(
        422,
        "File too large",
        f"{shown} is {size} bytes; files of this kind are read up to {max_bytes} bytes{where}",
    )


def _has_holes(fd: int, info: os.stat_result) -> bool:
    """Whether the open file has unallocated ranges (a sparse file).

    Cheap first: a file whose allocated blocks cover its size has no holes worth the name.
    Otherwise ``SEEK_HOLE`` says where the first hole is; file systems that allocate less than
    the size for other reasons (compression) or cannot tell report no hole before the end.
    """
    if info.st_size < SPARSE_CHECK_FROM_BYTES or info.st_blocks * 512 >= info.st_size // 2:
        return False
    try:
        return os.lseek(fd, 0, os.SEEK_HOLE) < info.st_size
    except OSError:
        return False


def check_regular(path: Path, shown: str) -> os.stat_result:
    """``stat`` of a client's file; refused (422) unless it is a regular file. Opens nothing."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise _unreadable(shown, exc) from None
    kind = not_regular(info.st_mode)
    if kind is not None:
        raise refuse_kind(shown, kind)
    return info


class ClientFile:
    """An opened client file: reads in chunks, within its byte budget and the deadline."""

    def __init__(
        self, fd: int, info: os.stat_result, shown: str, max_bytes: int | None, budget: ReadBudget
    ) -> None:
        self.fd, self.info, self.shown = fd, info, shown
        self.max_bytes, self.budget = max_bytes, budget
        self.consumed = 0

    @property
    def size(self) -> int:
        """The file's size when it was opened."""
        return self.info.st_size

    def read(self, count: int) -> bytes:
        """Up to ``count`` bytes (fewer only at the end of the file)."""
        parts: list[bytes] = []
        left = count
        while left > 0:
            self.budget.check(self.shown)
            try:
                part = os.read(self.fd, min(left, CHUNK_BYTES))
            except OSError as exc:
                raise _unreadable(self.shown, exc) from None
            if not part:
                break
            self.consumed += len(part)
            if self.max_bytes is not None and self.consumed > self.max_bytes:
                raise _too_large(self.shown, f"more than {self.max_bytes}", self.max_bytes, None)
            parts.append(part)
            left -= len(part)
        return b"".join(parts)

    def chunks(self) -> Iterator[bytes]:
        """The rest of the file, a chunk at a time."""
        while chunk := self.read(CHUNK_BYTES):
            yield chunk

    def read_all(self) -> bytes:
        """The rest of the file."""
        return b"".join(self.chunks())


@contextmanager
def open_client_file(
    path: Path,
    shown: str,
    budget: ReadBudget,
    *,
    max_bytes: int | None,
    setting: str | None = None,
) -> Iterator[ClientFile]:
    """Open a client's file for reading, once it is known to be a regular file without holes
    and within ``max_bytes`` (None: no size budget, for weights, whose size their header
    bounds; ``setting`` names the variable that sets the budget)."""
    info = check_regular(path, shown)
    if max_bytes is not None and info.st_size > max_bytes:
        raise _too_large(shown, info.st_size, max_bytes, setting)
    try:
        # O_NONBLOCK: should the path have become a FIFO since the stat, opening it must not
        # wait for a writer (reads of a regular file ignore the flag).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise _unreadable(shown, exc) from None
    try:
        opened = os.fstat(fd)
        kind = not_regular(opened.st_mode)
        if kind is not None:
            raise refuse_kind(shown, kind)
        if max_bytes is not None and opened.st_size > max_bytes:
            raise _too_large(shown, opened.st_size, max_bytes, setting)
        if _has_holes(fd, opened):
            raise Problem(
                422,
                "Sparse file refused",
                f"{shown} is a sparse file: it claims {opened.st_size} bytes but most of them "
                "were never written (a file with holes, or a download that did not finish)",
            )
        yield ClientFile(fd, opened, shown, max_bytes, budget)
    finally:
        os.close(fd)


def read_client_file(
    path: Path,
    shown: str,
    budget: ReadBudget,
    *,
    max_bytes: int | None = None,
    setting: str | None = None,
) -> bytes:
    """The whole of a client's file, read safely (see :func:`open_client_file`); by default
    within the budget of a metadata file (``FORGETGUARD_MAX_MODEL_FILE_BYTES``)."""
    if max_bytes is None:
        max_bytes, setting = budget.max_file_bytes, MAX_FILE_BYTES_SETTING
    with open_client_file(path, shown, budget, max_bytes=max_bytes, setting=setting) as file:
        return file.read_all()


def read_client_json(path: Path, shown: str, budget: ReadBudget) -> Any:
    """A client's JSON metadata file, parsed (422 naming the file when it is not UTF-8 JSON)."""
    raw = read_client_file(path, shown, budget)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise Problem(422, "Unreadable file", f"{shown} is not valid JSON: {reason}") from None


def hash_client_file(path: Path, shown: str, budget: ReadBudget) -> str:
    """The sha256 of a client's file (hex), read in chunks before the deadline."""
    digest = hashlib.sha256()
    with open_client_file(path, shown, budget, max_bytes=None) as file:
        left = file.size  # what was there when opened: a file that keeps growing is not read on
        while left > 0 and (chunk := file.read(min(left, CHUNK_BYTES))):
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()
