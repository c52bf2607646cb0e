"""Things routes get injected: settings, a database session."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.core.config import Settings


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


# Methods that only read; every other request may read then write.
_READ_ONLY = frozenset({"GET", "HEAD", "OPTIONS"})


def get_session(request: Request) -> Iterator[Session]:
    """A session for the request; it takes a connection only at its first statement.

    A request that may write (POST) gets an immediate transaction on SQLite, so two
    concurrent cancels or creates queue for the write lock instead of one failing with
    ``database is locked``.
    """
    state = request.app.state
    factory = state.sessionmaker if request.method in _READ_ONLY else state.write_sessionmaker
    with factory() as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
