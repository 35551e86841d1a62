"""etl.db against real servers: connect timeouts and keepalives, and cancelling a run's statements.

The cancel tests hold a real lock in one session and make a tracked session wait on it, then
cancel from another thread, as the run's watchdog does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from sqlalchemy import Connection, Engine, event, text
from sqlalchemy.exc import OperationalError

from etl import db
from tests.conftest import engine_for

pytestmark = pytest.mark.integration


class CancelSoon:
    """Calls `cancel` on another thread after a while; `told()` is what it returned."""

    def __init__(self, cancel: Callable[[], int], after_s: float) -> None:
        self._told: list[int] = []
        self._timer = threading.Timer(after_s, lambda: self._told.append(cancel()))
        self._timer.start()

    def told(self) -> list[int]:
        # The cancelled statement may fail before the cancel request returns.
        self._timer.join(10)
        return self._told


# --- connect settings --------------------------------------------------------------------------


@pytest.mark.postgres
def test_postgres_engine__connect_timeout_and_keepalives_unless_the_url_says(
    postgres_url: str,
) -> None:
    with engine_for(postgres_url) as engine, engine.connect() as connection:
        defaults = connection.connection.dbapi_connection.info.get_parameters()  # type: ignore[union-attr]
    with engine_for(f"{postgres_url}?connect_timeout=3") as engine, engine.connect() as connection:
        overridden = connection.connection.dbapi_connection.info.get_parameters()  # type: ignore[union-attr]

    expected = {k: str(v) for k, v in db.POSTGRES_CONNECT_ARGS.items()}
    assert {k: defaults.get(k) for k in expected} == expected
    assert overridden["connect_timeout"] == "3"
    assert overridden["keepalives_idle"] == "30"


@pytest.mark.mariadb
def test_mariadb_engine__connect_read_and_write_timeouts(mariadb_url: str) -> None:
    with engine_for(mariadb_url) as engine, engine.connect() as connection:
        raw = connection.connection.dbapi_connection
        found = (raw.connect_timeout, raw._read_timeout, raw._write_timeout)  # type: ignore[union-attr]
    assert found == (
        db.MYSQL_CONNECT_ARGS["connect_timeout"],
        db.MYSQL_CONNECT_ARGS["read_timeout"],
        db.MYSQL_CONNECT_ARGS["write_timeout"],
    )


# --- cancelling ------------------------------------------------------------------------------


def _lock_wait(engine: Engine, holder: Connection) -> str:
    """Take a row lock with `holder`; the statement that waits for it in another session."""
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE held (id INTEGER PRIMARY KEY, v INTEGER)"))
        connection.execute(text("INSERT INTO held VALUES (1, 0)"))
    holder.begin()
    holder.execute(text("SELECT v FROM held WHERE id = 1 FOR UPDATE"))
    return "UPDATE held SET v = 1 WHERE id = 1"


@pytest.mark.parametrize(
    "server",
    [
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("mariadb", marks=pytest.mark.mariadb),
    ],
)
def test_cancel__ends_a_lock_wait_of_a_tracked_connection_and_the_next_statement_works(
    server: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue(f"{server}_url")
    with engine_for(url) as engine, engine.connect() as holder:
        waiting_sql = _lock_wait(engine, holder)
        with db.track_run_connections(engine) as tracked, engine.connect() as connection:
            assert len(tracked) == 1
            canceller = CancelSoon(
                lambda: tracked.cancel(checked_out_before=time.monotonic()), after_s=0.5
            )
            started = time.monotonic()
            with pytest.raises(OperationalError) as cancelled, connection.begin():
                connection.execute(text(waiting_sql))
            waited = time.monotonic() - started
            # The session survives its cancelled statement: a run can still close itself.
            assert connection.execute(text("SELECT 1")).scalar() == 1
        assert len(tracked) == 0, "checked in: no longer the run's"
        holder.rollback()

    assert canceller.told() == [1]
    assert 0.4 < waited < 5
    message = str(cancelled.value.orig).lower()
    assert "cancel" in message or "interrupted" in message


@pytest.mark.postgres
def test_cancel__spares_connections_checked_out_after_the_cut(
    postgres_url: str,
) -> None:
    """The watchdog's rule: what the run checked out after the cut (closing it) is not cut."""
    with engine_for(postgres_url) as engine, engine.connect() as holder:
        waiting_sql = _lock_wait(engine, holder)
        cut = time.monotonic()
        with db.track_run_connections(engine) as tracked, engine.connect() as later:
            canceller = CancelSoon(lambda: tracked.cancel(checked_out_before=cut), after_s=0.5)
            with later.begin():
                # Waits until the holder lets go, the cancel having passed it by.
                threading.Timer(1.5, holder.rollback).start()
                later.execute(text(waiting_sql))
        assert canceller.told() == [0]


def test_cancel__interrupts_a_running_sqlite_statement(sqlite_url: str) -> None:
    """SQLite has no server: interrupt() ends the statement the connection is running."""
    endless = (
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) "
        "SELECT COUNT(*) FROM n WHERE i < 0"
    )
    with (
        engine_for(sqlite_url) as engine,
        db.track_run_connections(engine) as tracked,
        engine.connect() as connection,
    ):
        canceller = CancelSoon(
            lambda: tracked.cancel(checked_out_before=time.monotonic()), after_s=0.3
        )
        started = time.monotonic()
        with pytest.raises(OperationalError, match="interrupted"):
            connection.execute(text(endless))
        waited = time.monotonic() - started
        assert connection.execute(text("SELECT 1")).scalar() == 1
    assert canceller.told() == [1]
    assert waited < 5


def test_tracking__follows_the_context_into_threads_that_copy_it(sqlite_url: str) -> None:
    """The writer thread copies the run's context: its connection is the run's too."""
    import contextvars

    seen: list[int] = []
    with engine_for(sqlite_url) as engine, db.track_run_connections(engine) as tracked:

        def work() -> None:
            with engine.connect():
                seen.append(len(tracked))

        copied = contextvars.copy_context()
        thread = threading.Thread(target=copied.run, args=(work,))
        thread.start()
        thread.join()
        stranger = threading.Thread(target=work)  # a new thread starts with an empty context
        stranger.start()
        stranger.join()
    assert seen == [1, 0]


def test_migrations__are_never_cancelled_with_the_run(sqlite_url: str) -> None:
    """A migration cut half-way would leave MySQL between revisions: it is no run's to cancel."""
    seen: list[int] = []
    with engine_for(sqlite_url) as engine, db.track_run_connections(engine) as tracked:
        # Listeners run in order: this one after the tracking one of make_engine.
        event.listen(engine, "checkout", lambda *_: seen.append(len(tracked)))
        db.upgrade(engine)
        during, seen[:] = list(seen), []
        with engine.connect():
            pass
    assert during
    assert set(during) == {0}
    assert seen == [1], "outside the migration, the run's connections are tracked"
