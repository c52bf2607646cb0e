"""Reading a client's files for a request, apart from what every other request needs.

A submission reads the model folder (and dataset) it names: configs, tokenizer files,
safetensors headers, the first hash of new weights. That is file work on files a client
prepared, so it runs here:

- in a thread pool of its own (a quarter of ``FORGETGUARD_API_THREADS``), never in the pool
  that serves every other request, and before the request takes a database slot: a request
  whose folder is slow to read holds neither a connection nor a thread other requests need,
  so ``/healthz`` and every read keep answering;
- within ``FORGETGUARD_CLIENT_READ_SECONDS``: the reads stop themselves at that deadline
  (app.core.clientfiles), and the request is answered then even if a read is stuck in the
  kernel (a hung network file system), which leaves that thread behind.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
from anyio import to_thread
from fastapi import Request

from app.core.clientfiles import READ_SECONDS_SETTING
from app.core.config import Settings
from app.core.errors import Problem

T = TypeVar("T")
# Seconds past the deadline before a request stops waiting for a read that did not stop itself.
STUCK_READ_GRACE_SECONDS = 5.0


def file_work_limiter(settings: Settings) -> anyio.CapacityLimiter:
    """The pool size of file work: a quarter of the API's threads, at least one."""
    return anyio.CapacityLimiter(max(1, settings.api_threads // 4))


async def run_file_work(request: Request, work: Callable[..., T], /, **kwargs: Any) -> T:
    """``work(**kwargs)`` in the file-work pool, answered by the read deadline at the latest."""
    settings: Settings = request.app.state.settings
    limiter: anyio.CapacityLimiter = request.app.state.file_work
    seconds = settings.client_read_seconds
    with anyio.move_on_after(seconds + STUCK_READ_GRACE_SECONDS) as scope:
        return await to_thread.run_sync(
            functools.partial(work, **kwargs), limiter=limiter, abandon_on_cancel=True
        )
    assert scope.cancelled_caught
    raise Problem(
        422,
        "Files too slow to read",
        f"the files this request names could not be read within {seconds:g} s: the file "
        f"system holding them does not answer (the operator sets {READ_SECONDS_SETTING})",
    )
