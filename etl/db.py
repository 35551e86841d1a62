"""Database plumbing: engines with the right per-dialect settings, and Alembic migrations.

SQLAlchemy errors met here become `DatabaseError` (exit 3) with the URL's password hidden.
Alembic is imported only when a migration has to be looked at: a sync against a database at
`HEAD_REVISION` checks that with one query, and skips a third of a second of Alembic.

A run's deadline must reach the database too: a lock wait or a dead connection would otherwise
hang the run forever. `track_run_connections` records the DBAPI connections a run checks out
(from any thread that carries its context: the writer's too), and `RunConnections.cancel` ends
their statements in flight from another thread (PostgreSQL: a cancel request; SQLite: interrupt;
MySQL/MariaDB: KILL QUERY). Engines also get connect timeouts and TCP keepalives, so that a
server that died silently is noticed instead of waited for.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from importlib.resources import files
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import URL, Connection, Engine, create_engine, event, make_url, text
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from etl.errors import DatabaseError

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

log = structlog.get_logger("etl.db")

SQLITE_BUSY_TIMEOUT_S = 30
CONNECT_TIMEOUT_S = 10
# libpq (psycopg, psycopg2): probe an idle connection after 30 s, give up after 3 unanswered
# probes 10 s apart; data sent and never acknowledged fails the connection after 60 s. A server
# that vanished (power cut, dropped route) is then noticed in about a minute, not two hours.
POSTGRES_CONNECT_ARGS: dict[str, int] = {
    "connect_timeout": CONNECT_TIMEOUT_S,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 60_000,
}
# PyMySQL has no keepalive settings: a reply awaited longer than any statement trakt-etl sends
# (a migration included) means the server is gone. Lock waits end sooner, by cancellation.
MYSQL_CONNECT_ARGS: dict[str, int] = {
    "connect_timeout": CONNECT_TIMEOUT_S,
    "read_timeout": 900,
    "write_timeout": 60,
}
CANCEL_TIMEOUT_S = 5.0
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
    options: dict[str, Any] = {"pool_pre_ping": True, "connect_args": _connect_args(parsed)}
    try:
        engine = create_engine(parsed, **options)
    except (SQLAlchemyError, ImportError) as exc:
        raise DatabaseError(f"cannot use database {safe_url(url)}: {exc}") from exc
    if engine.dialect.name == "sqlite":
        _make_sqlite_transactional(engine)
    _track_checkouts(engine)
    return engine


def _connect_args(url: URL) -> dict[str, Any]:
    """Timeouts and keepalives for the driver; what the URL's query sets itself wins."""
    backend, driver = url.get_backend_name(), url.get_driver_name()
    if backend == "sqlite":
        return {"timeout": SQLITE_BUSY_TIMEOUT_S}
    defaults: dict[str, Any] = {}
    if backend == "postgresql" and driver in ("psycopg", "psycopg2"):
        defaults = POSTGRES_CONNECT_ARGS
    elif backend in ("mysql", "mariadb") and driver == "pymysql":
        defaults = MYSQL_CONNECT_ARGS
    return {key: value for key, value in defaults.items() if key not in url.query}


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


# --- cancelling a run's statements ----------------------------------------------------------

_RUN_CONNECTIONS: ContextVar[RunConnections | None] = ContextVar(
    "trakt_etl_run_connections", default=None
)
_TRACKED = "trakt_etl_run_connections"  # the connection record's info key


class RunConnections:
    """The DBAPI connections one run has checked out, and when; thread-safe.

    Filled by the engine's checkout and checkin events (`_track_checkouts`), which cost a dict
    insert and delete per transaction.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._open: dict[int, tuple[Any, float]] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._open)

    def add(self, key: int, dbapi_connection: Any) -> None:
        with self._lock:
            self._open[key] = (dbapi_connection, time.monotonic())

    def discard(self, key: int) -> None:
        with self._lock:
            self._open.pop(key, None)

    def cancel(self, *, checked_out_before: float) -> int:
        """Cancel the statement in flight, if any, on each connection checked out before that
        monotonic time; how many connections were told. An idle connection is not affected."""
        with self._lock:
            targets = [conn for conn, since in self._open.values() if since < checked_out_before]
        told = 0
        for dbapi_connection in targets:
            try:
                cancel_statement(self._engine, dbapi_connection)
                told += 1
            except Exception as exc:  # the server may be gone: keepalives end those
                log.warning("db.cancel_failed", error=str(exc).strip().splitlines()[0])
        return told


@contextmanager
def track_run_connections(engine: Engine) -> Iterator[RunConnections]:
    """Record the connections checked out in this context (and in threads that copy it)."""
    tracked = RunConnections(engine)
    token = _RUN_CONNECTIONS.set(tracked)
    try:
        yield tracked
    finally:
        _RUN_CONNECTIONS.reset(token)


@contextmanager
def _untracked() -> Iterator[None]:
    """Connections checked out here are no run's: never cancelled. A migration must not be cut
    half-way: MySQL commits each DDL statement on its own, and would be left between revisions."""
    token = _RUN_CONNECTIONS.set(None)
    try:
        yield
    finally:
        _RUN_CONNECTIONS.reset(token)


def _track_checkouts(engine: Engine) -> None:
    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        tracked = _RUN_CONNECTIONS.get()
        if tracked is not None:
            tracked.add(id(record), dbapi_connection)
            record.info[_TRACKED] = tracked

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
        # Checked in from whatever thread: the record says which run had it.
        tracked = record.info.pop(_TRACKED, None)
        if tracked is not None:
            tracked.discard(id(record))


def cancel_statement(engine: Engine, dbapi_connection: Any) -> None:
    """End the statement running on `dbapi_connection` with an error, from any thread."""
    dialect = engine.dialect.name
    if dialect == "postgresql":
        cancel_safe = getattr(dbapi_connection, "cancel_safe", None)  # psycopg 3.2+
        if cancel_safe is not None:
            cancel_safe(timeout=CANCEL_TIMEOUT_S)
        else:
            dbapi_connection.cancel()
    elif dialect == "sqlite":
        dbapi_connection.interrupt()
    elif dialect in ("mysql", "mariadb"):
        _kill_query(engine, int(dbapi_connection.thread_id()))
    else:
        raise DatabaseError(f"cannot cancel statements on {dialect}")


def _kill_query(engine: Engine, thread_id: int) -> None:
    """MySQL cancels a statement from another session: a fresh one, outside the pool (which
    may be exhausted, or be what hangs)."""
    cargs, cparams = engine.dialect.create_connect_args(engine.url)
    cparams.update(_connect_args(engine.url), connect_timeout=round(CANCEL_TIMEOUT_S))
    killer = engine.dialect.loaded_dbapi.connect(*cargs, **cparams)
    try:
        with killer.cursor() as cursor:
            cursor.execute(f"KILL QUERY {thread_id}")
    finally:
        killer.close()


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
        with _untracked(), engine.begin() as connection, _migration_lock(connection):
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
