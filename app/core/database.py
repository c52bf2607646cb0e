"""Database engine and sessions for SQLite (embedded default) and PostgreSQL (scale-out)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

# The Alembic scripts ship inside the package, so an installed wheel migrates as a checkout does.
MIGRATIONS_DIR = Path(str(files("app.migrations")))


def _prepare_sqlite(engine: Engine) -> None:
    """WAL, a busy timeout, and explicit BEGIN so a claim can take the write lock up front.

    pysqlite's own transaction handling delays BEGIN until the first write; we emit BEGIN
    ourselves (the SQLAlchemy-documented recipe) and make it ``BEGIN IMMEDIATE`` for
    connections opened with ``execution_options(immediate=True)``: the queue's claim runs
    there, so two workers can never read the same queued row and both take it.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        immediate = conn.get_execution_options().get("immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def make_engine(url: str, *, pool_size: int = 10, max_overflow: int = 20) -> Engine:
    """Create an engine; for SQLite, the file's directory is created on first use.

    ``pool_size`` connections are kept and ``max_overflow`` more may open under load. The API
    admits fewer requests to the database at once than that (``app.web.deps.get_session``),
    so a request never waits for a connection (``QueuePool limit reached`` under load).
    """
    parsed = make_url(url)
    pool = {"pool_size": pool_size, "max_overflow": max_overflow, "pool_timeout": 60}
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(
                url, connect_args={"timeout": 30, "check_same_thread": False}, **pool
            )
        else:
            engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        _prepare_sqlite(engine)
        return engine
    return create_engine(url, pool_pre_ping=True, **pool)


def session_factory(engine: Engine, *, immediate: bool = False) -> sessionmaker[Session]:
    """A sessionmaker whose objects stay readable after commit.

    ``immediate``: its transactions take SQLite's write lock at BEGIN (see ``_prepare_sqlite``;
    PostgreSQL ignores it). For sessions that read and then write: a deferred SQLite
    transaction that read before another connection committed cannot write any more, and
    fails with ``database is locked`` at once, whatever the busy timeout. Taking the lock at
    BEGIN makes concurrent writers wait their turn instead. Connections are still acquired
    lazily, at the session's first statement.
    """
    bind = engine.execution_options(immediate=True) if immediate else engine
    return sessionmaker(bind, expire_on_commit=False)


@contextmanager
def immediate_session(engine: Engine) -> Iterator[Session]:
    """A session whose transaction takes SQLite's write lock at BEGIN (a no-op on PostgreSQL)."""
    with engine.connect() as conn:
        conn = conn.execution_options(immediate=True)
        with Session(bind=conn, expire_on_commit=False) as session:
            yield session


def alembic_config(url: str) -> Any:
    """An Alembic config pointing at the package's migrations and the given database."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def _quiet_alembic() -> None:
    """Keep Alembic's INFO lines that say something happened ("Running upgrade 0001 -> 0002"),
    drop the ones it prints at every start (plugin set-up, dialect notes)."""
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    migration = logging.getLogger("alembic.runtime.migration")
    if not any(isinstance(f, _RoutineAlembicLines) for f in migration.filters):
        migration.addFilter(_RoutineAlembicLines())


class _RoutineAlembicLines(logging.Filter):
    ROUTINE = ("Context impl ", "Will assume ")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.ROUTINE)


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the schema to ``revision``; migrations are the only way the schema is made."""
    _quiet_alembic()  # before the import: Alembic logs its plugin set-up as it loads
    from alembic import command

    if make_url(url).get_backend_name() == "sqlite":
        make_engine(url).dispose()  # creates the parent directory
    command.upgrade(alembic_config(url), revision)
