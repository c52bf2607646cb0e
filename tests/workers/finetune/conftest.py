"""Fixtures for fine-tune jobs on real worker processes: the test's engine, the workers it
started (killed at the end), short leases."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from app.core.config import Settings
from app.core.database import make_engine


@pytest.fixture
def fast_lease(settings: Settings) -> Settings:
    """Short leases, so a killed worker's job is claimed again within seconds."""
    return type(settings)(**{**settings.model_dump(), "lease_seconds": 5, "heartbeat_seconds": 1})


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    engine = make_engine(settings.database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:  # only the workers this test started
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
