"""Things routes get injected: settings, a database session."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.core.config import Settings


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


@asynccontextmanager
async def database_session(request: Request) -> AsyncIterator[Session]:
    """A session, once one of the API's database slots is free (see :func:`get_session`);
    for async routes that do other work (reading a client's files) before or between."""
    async with request.app.state.database_slots:
        session: Session = request.app.state.sessionmaker()
        try:
            yield session
        finally:
            session.close()


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A session for the request, once one of the API's database slots is free.

    Each request holding a session may hold one connection, and keeps it until its response
    is serialised, which needs a thread of its own: with more such requests than connections,
    every thread could wait for a connection held by a request that waits for a thread
    (``QueuePool limit reached``, 500, under load). Slots are fewer than the pool's
    connections, so that wait cannot happen; a request waits for a slot in the event loop,
    holding neither a thread nor a connection. The session is closed here too, in the loop.
    """
    async with database_session(request) as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
