"""Database plumbing: engines with the right per-dialect settings, and Alembic migrations.

SQLAlchemy errors met here become `DatabaseError` (exit 3) with the URL's password hidden.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, make_url, text
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from etl.errors import DatabaseError

SQLITE_BUSY_TIMEOUT_S = 30


def safe_url(url: str) -> str:
    """The URL as it may be shown: with its password masked."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable database URL>"


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite gets foreign keys, WAL and real transactions."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise DatabaseError(f"database.url is not a valid SQLAlchemy URL: {safe_url(url)}") from exc
    options: dict[str, Any] = {"pool_pre_ping": True}
    if parsed.get_backend_name() == "sqlite":
        options["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
    try:
        engine = create_engine(parsed, **options)
    except (SQLAlchemyError, ImportError) as exc:
        raise DatabaseError(f"cannot use database {safe_url(url)}: {exc}") from exc
    if engine.dialect.name == "sqlite":
        _make_sqlite_transactional(engine)
    return engine


def _make_sqlite_transactional(engine: Engine) -> None:
    """Let SQLAlchemy, not pysqlite, decide where transactions begin.

    pysqlite starts a transaction only before the first write, so a read-then-write would not be
    atomic; this is SQLAlchemy's documented recipe for SQLite transactions that behave.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys = ON")
        if engine.url.database not in (None, "", ":memory:"):
            cursor.execute("PRAGMA journal_mode = WAL")
            # With WAL, NORMAL still survives a killed process; only an OS crash or power cut
            # can lose the last commits. FULL would fsync on every account's commit.
            cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # IMMEDIATE takes the write lock up front. A deferred transaction that reads, then
        # writes after another connection committed, fails at once with "database is locked"
        # (WAL cannot upgrade its stale snapshot) instead of waiting out the busy timeout; the
        # heartbeat thread and the writer would meet that. Only one process writes (etl.dblock), its
        # transactions are short, and other programs' readers are never blocked by WAL.
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def check_reachable(engine: Engine) -> None:
    """Fail with `DatabaseError` unless a trivial query goes through."""
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise DatabaseError(
            f"database {engine.url.render_as_string(hide_password=True)} is unreachable: {reason}"
        ) from exc


def _alembic_config() -> AlembicConfig:
    """Alembic pointed at the migration scripts shipped inside the installed package."""
    config = AlembicConfig()
    config.set_main_option("script_location", str(files("etl.migrations")))
    return config


def heads() -> tuple[str, ...]:
    """The head revisions of the migration scripts (exactly one in a linear history)."""
    return tuple(ScriptDirectory.from_config(_alembic_config()).get_heads())


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None for an empty database."""
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    except SQLAlchemyError as exc:
        raise DatabaseError(f"cannot read the schema revision: {exc}") from exc


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to `revision` (Alembic), in one transaction where the database allows."""
    config = _alembic_config()
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    except SQLAlchemyError as exc:
        raise DatabaseError(f"migration to {revision} failed: {exc}") from exc


def downgrade(engine: Engine, revision: str = "base") -> None:
    """Take the schema back to `revision` (tests and operators undoing an upgrade)."""
    config = _alembic_config()
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, revision)
    except SQLAlchemyError as exc:
        raise DatabaseError(f"downgrade to {revision} failed: {exc}") from exc


def ensure_schema(engine: Engine, *, auto_migrate: bool) -> None:
    """Upgrade when allowed; otherwise refuse to work on a schema that is not at head."""
    if auto_migrate:
        upgrade(engine)
        return
    at, wanted = current_revision(engine), heads()
    if (at,) != wanted:
        raise DatabaseError(
            f"the database schema is at {at or 'nothing (empty database)'}, this trakt-etl "
            f"needs {', '.join(wanted)}: run `trakt-etl db upgrade` or set database.auto_migrate"
        )
