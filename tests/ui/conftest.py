"""Fixtures for the dashboard tests: seeded before/after pairs and direct database access."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.tables import Evaluation, new_id
from tests.ui.seed import Pair, seed_collapsed_pair, seed_healthy_pair


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    """Like the suite-wide ``settings``, without building the tiny model: pages need no model."""
    return Settings(
        database_url=database_url,
        model_roots=[tmp_path / "models"],
        data_roots=[tmp_path / "data"],
        artifacts_dir=tmp_path / "artifacts",
        cache_dir=tmp_path / "cache",
    )


@pytest.fixture
def db(client: Any) -> Callable[[], Session]:
    """A session factory on the test app's database."""
    return client.app.state.sessionmaker  # type: ignore[no-any-return]


@pytest.fixture
def collapsed(db: Callable[[], Session]) -> Pair:
    """Base vs collapsed full fine-tune, one forgotten answer being a ``<script>`` payload."""
    with db() as session:
        return seed_collapsed_pair(session, script_response=True)


@pytest.fixture
def healthy(db: Callable[[], Session]) -> Pair:
    """Base vs a gentle LoRA fine-tune that kept what it knew."""
    with db() as session:
        return seed_healthy_pair(session)


def add_evaluation(session: Session, **fields: Any) -> str:
    """Insert a bare evaluation row (status, progress, … as given) and commit."""
    values: dict[str, Any] = {
        "model_path": "models/smollm2-135m-instruct",
        "generation": {"max_new_tokens": 50},
        "suites": [],
        "status": "queued",
        "progress": {"done": 0, "total": 0, "stage": "queued"},
    }
    values.update(fields)
    row = Evaluation(id=new_id("ev"), **values)
    session.add(row)
    session.commit()
    return row.id
