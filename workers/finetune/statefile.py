"""The one way the fine-tune worker writes and reads its own state and meta files.

Every JSON state file of a job directory (a stage's results, a snapshot's meta, a checkpoint's
``state.json`` …) is written by :func:`write_atomic`: a temporary file in the same folder,
flushed and fsynced, then ``os.replace``. A crash or a full disk therefore leaves the old
file or the new one, never an empty or torn one; a failed write removes its temporary file and
a full disk (``ENOSPC``) becomes :class:`DiskFull`, whose message says so.

:func:`read_state` reads them back defensively: a missing, truncated, empty or foreign file
is ``None`` (logged), so the stage that owns it redoes its work instead of failing the job.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger("forgetguard.worker")


class DiskFull(OSError):
    """A write of the job directory ran out of space (``ENOSPC``)."""


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is ``ENOSPC``: an ``OSError``, or a library's own
    error around one (torch.save's RuntimeError, safetensors' "os error 28")."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        text = str(seen)
        if "No space left on device" in text or "os error 28" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


# Free space under which a failed write is taken for a full disk: libraries that write through
# C++ streams (torch.save to a path, as DeepSpeed does) lose ENOSPC ("iostream error").
NEARLY_FULL_BYTES = 1 << 20


def raise_if_disk_full(exc: BaseException, what: str, folder: Path | None = None) -> None:
    """Raise :class:`DiskFull` (from ``exc``), naming ``what``, when ``exc`` is ``ENOSPC``, or
    when the device that holds ``folder`` (where the failed write went) is nearly full."""
    if is_disk_full(exc) or (folder is not None and _nearly_full(folder)):
        raise DiskFull(
            errno.ENOSPC,
            f"the disk is full: {what} could not be written (no space left on the device "
            "that holds FORGETGUARD_ARTIFACTS_DIR); free space and retry",
        ) from exc


def _nearly_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < NEARLY_FULL_BYTES
    except OSError:
        return False


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` atomically: temp file in its folder, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{random.getrandbits(32):08x}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(payload)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise_if_disk_full(exc, path.name)
        raise
    _fsync_dir(path.parent)


def write_json(path: Path, value: Any) -> None:
    """:func:`write_atomic` of ``value`` as JSON."""
    write_atomic(path, json.dumps(value, ensure_ascii=False))


def read_state(path: Path) -> dict[str, Any] | None:
    """A JSON object this worker wrote, or ``None`` when it is missing or unreadable.

    An unreadable file (empty, truncated, not an object) is logged and removed, so the stage
    that owns it starts over.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("state file %s is unreadable (%s); its stage starts over", path.name, exc)
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, dict):
        log.warning("state file %s is empty or torn; its stage starts over", path.name)
        path.unlink(missing_ok=True)
        return None
    return value


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (best effort: not every file system can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
