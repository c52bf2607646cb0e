"""Alembic environment: one code path for SQLite (batch mode) and PostgreSQL."""

from __future__ import annotations

from alembic import context

from app.core.config import get_settings
from app.core.database import make_engine
from app.core.tables import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    """The URL ``forgetguard db upgrade`` passes; else (plain ``alembic``) the settings' one."""
    section = config.config_ini_section
    url = config.file_config.get(section, "sqlalchemy.url", fallback=None)
    return url or get_settings().database_url


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(_url())
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
