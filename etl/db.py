"""Database plumbing: engines with the right per-dialect settings, and Alembic migrations.

SQLAlchemy errors met here become `DatabaseError` (exit 3) with the URL's password hidden.
Alembic is imported only when a migration has to be looked at: a sync against a database at
`HEAD_REVISION` checks that with one query, and skips a third of a second of Alembic.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, event, make_url, text
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from etl.errors import DatabaseError

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

SQLITE_BUSY_TIMEOUT_S = 30
# The newest migration; the migration tests check that it is the scripts' one head.
HEAD_REVISION = "0005"


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
    from alembic.config import Config as AlembicConfig

    config = AlembicConfig()
    config.set_main_option("script_location", str(files("etl.migrations")))
    return config


def heads() -> tuple[str, ...]:
    """The head revisions of the migration scripts (exactly one in a linear history)."""
    from alembic.script import ScriptDirectory

    return tuple(ScriptDirectory.from_config(_alembic_config()).get_heads())


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None for an empty database."""
    from alembic.runtime.migration import MigrationContext

    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    except SQLAlchemyError as exc:
        raise DatabaseError(f"cannot read the schema revision: {exc}") from exc


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to `revision` (Alembic), in one transaction where the database allows."""
    from alembic import command

    config = _alembic_config()
    try:
        with engine.begin() as connection, _migration_lock(connection):
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    except SQLAlchemyError as exc:
        raise DatabaseError(f"migration to {revision} failed: {exc}") from exc


# Several workers starting at once against one new database would all create the schema; the
# first one to take this lock does, the others then find it at head.
_MIGRATION_LOCK = 7_316_871_002  # any constant; the same in every trakt-etl


@contextmanager
def _migration_lock(connection: Connection) -> Iterator[None]:
    """The database's migration lock, held for the block (PostgreSQL: until the transaction
    ends; MariaDB: a named lock of the session, released here)."""
    dialect = connection.dialect.name
    if dialect == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        yield
    elif dialect in ("mysql", "mariadb"):
        name = {"name": f"trakt-etl-{_MIGRATION_LOCK}"}
        if connection.execute(text("SELECT GET_LOCK(:name, 300)"), name).scalar() != 1:
            raise DatabaseError("another process held the migration lock for 5 minutes")
        try:
            yield
        finally:
            connection.execute(text("SELECT RELEASE_LOCK(:name)"), name)
    else:  # SQLite: one process at a time anyway (etl.dblock)
        yield


def downgrade(engine: Engine, revision: str = "base") -> None:
    """Take the schema back to `revision` (tests and operators undoing an upgrade)."""
    from alembic import command

    config = _alembic_config()
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, revision)
    except SQLAlchemyError as exc:
        raise DatabaseError(f"downgrade to {revision} failed: {exc}") from exc


def ensure_schema(engine: Engine, *, auto_migrate: bool) -> None:
    """Upgrade when allowed; otherwise refuse to work on a schema that is not at head."""
    if _stored_revision(engine) == HEAD_REVISION:
        return
    if auto_migrate:
        upgrade(engine)
        return
    at, wanted = current_revision(engine), heads()
    if (at,) != wanted:
        raise DatabaseError(
            f"the database schema is at {at or 'nothing (empty database)'}, this trakt-etl "
            f"needs {', '.join(wanted)}: run `trakt-etl db upgrade` or set database.auto_migrate"
        )


def _stored_revision(engine: Engine) -> str | None:
    """alembic_version's row, read directly; None if there is none (or no such table)."""
    try:
        with engine.connect() as connection:
            found = connection.execute(text("SELECT version_num FROM alembic_version")).all()
    except SQLAlchemyError:
        return None
    return str(found[0][0]) if len(found) == 1 else None

