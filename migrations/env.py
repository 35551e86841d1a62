"""Alembic environment: runs migrations on the connection trakt-etl hands over, or on a URL.

trakt-etl passes its open connection in `config.attributes["connection"]` (so a migration runs
inside the program's own engine settings); the plain `alembic` command uses
$TRAKT_ETL_DATABASE_URL or `sqlalchemy.url` from alembic.ini.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import Connection, create_engine

from etl.models import metadata

config = context.config


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = os.environ.get("TRAKT_ETL_DATABASE_URL") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("set TRAKT_ETL_DATABASE_URL (or sqlalchemy.url in alembic.ini)")
    engine = create_engine(url)
    with engine.connect() as conn:
        _run(conn)
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run against a database")
run_migrations_online()
