"""A real HTTP server for browser tests, and Debian's Chromium driven by Playwright.

No browser is ever downloaded: Playwright's Python package drives the system Chromium
(``apt-get install -y chromium``) through ``executable_path``.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI

from tests.conftest import free_port

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
INSTALL_HINT = (
    "apt-get install -y chromium && pip install -e '.[dev]' "
    "(Playwright's Python package; no browser download)"
)


def chromium_path() -> str | None:
    """The system Chromium, if installed (``FORGETGUARD_CHROMIUM`` overrides)."""
    override = os.environ.get("FORGETGUARD_CHROMIUM")
    if override:
        return override if os.path.exists(override) else None
    for candidate in CHROMIUM_CANDIDATES:
        if os.path.exists(candidate):
            return candidate
    found = shutil.which("chromium")
    return found


def missing_browser_reason() -> str | None:
    """Why browser tests cannot run here, or ``None`` when they can."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return f"Playwright's Python package is not installed; {INSTALL_HINT}"
    if chromium_path() is None:
        where = os.environ.get("FORGETGUARD_CHROMIUM") or ", ".join(CHROMIUM_CANDIDATES)
        return f"no system Chromium at {where}; {INSTALL_HINT}"
    return None


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread on 127.0.0.1:<random port>; yield its URL."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on 127.0.0.1:{port}")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless system Chromium (a Playwright ``Browser``)."""
    from playwright.sync_api import sync_playwright

    path = chromium_path()
    if path is None:
        raise RuntimeError(f"no system Chromium; {INSTALL_HINT}")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
