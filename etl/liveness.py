"""Who is alive: the `workers` table, heartbeats, and telling dead runs from live ones.

Every process that syncs registers a worker row and refreshes its heartbeat (and that of its
running run) every few seconds. A run left `running` is dead when its process is gone: on this
host its pid no longer exists; anywhere, its heartbeat is older than `stale_after_s`. Only dead
runs are ever marked `aborted`, so a second process never aborts a run that is still going.

"This host" is the name a worker records: `$TRAKT_ETL_WORKER_HOST` if set (containers get random
host names; operators want stable ones), else the host name. Processes that record the same name
must see each other's pids (one machine, one pid namespace): that is how a worker judges a peer
on its own host dead at once, instead of after `stale_after_s`.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta

import structlog
from sqlalchemy import Connection, Engine, func, insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from etl import __version__, claims, runs
from etl.models import sync_runs, workers
from etl.runs import RunStatus

log = structlog.get_logger("etl.liveness")

WORKER_HOST_ENV = "TRAKT_ETL_WORKER_HOST"
HOST_MAX_LENGTH = 255  # workers.host, sync_runs.host


def worker_host(environ: Mapping[str, str]) -> str:
    """The host name this process records: `$TRAKT_ETL_WORKER_HOST`, else the machine's."""
    chosen = environ.get(WORKER_HOST_ENV, "").strip()
    return (chosen or socket.gethostname())[:HOST_MAX_LENGTH]


HOST = worker_host(os.environ)  # read once: a worker keeps its name for its whole life
DEFAULT_HEARTBEAT_S = 15.0


def stale_after(heartbeat_s: float) -> float:
    """How old a heartbeat may be before its process counts as dead: four missed beats, >= 60 s."""
    return max(60.0, 4 * heartbeat_s)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def register_worker(connection: Connection, *, kind: str, now: datetime) -> int:
    result = connection.execute(
        insert(workers).values(
            host=HOST,
            pid=os.getpid(),
            kind=kind,
            state="running",
            started_at=now,
            heartbeat_at=now,
            version=__version__,
        )
    )
    key = result.inserted_primary_key
    assert key is not None
    return int(key[0])


def beat(
    connection: Connection, worker_id: int, now: datetime, *, lease_s: float | None = None
) -> None:
    """Refresh the worker's heartbeat, its running run's and its account leases."""
    running = connection.execute(
        select(sync_runs.c.id).where(
            sync_runs.c.worker_id == worker_id, sync_runs.c.status == RunStatus.RUNNING
        )
    ).scalar_one_or_none()
    connection.execute(
        update(workers)
        .where(workers.c.id == worker_id)
        .values(heartbeat_at=now, current_run_id=running, state="running")
    )
    if running is not None:
        connection.execute(
            update(sync_runs).where(sync_runs.c.id == running).values(heartbeat_at=now)
        )
    if lease_s is not None:
        claims.renew(connection, worker_id, now, lease_s)


def retire_worker(connection: Connection, worker_id: int, now: datetime) -> None:
    connection.execute(
        update(workers)
        .where(workers.c.id == worker_id)
        .values(state="stopped", stopped_at=now, heartbeat_at=now, current_run_id=None)
    )


def dead_runs(connection: Connection, now: datetime, *, stale_after_s: float) -> list[int]:
    """Runs marked `running` whose process is gone.

    A run is judged by its worker's host and pid where it has a worker: that row holds the name
    the process chose for itself (`HOST`), which is what the other workers compare with theirs.
    """
    stale_before = now - timedelta(seconds=stale_after_s)
    dead: list[int] = []
    rows = connection.execute(
        select(
            sync_runs.c.id,
            func.coalesce(workers.c.host, sync_runs.c.host).label("host"),
            func.coalesce(workers.c.pid, sync_runs.c.pid).label("pid"),
            sync_runs.c.started_at,
            sync_runs.c.heartbeat_at,
        )
        .select_from(sync_runs.outerjoin(workers, workers.c.id == sync_runs.c.worker_id))
        .where(sync_runs.c.status == RunStatus.RUNNING)
    )
    for row in rows:
        last_seen = row.heartbeat_at or row.started_at
        on_this_host = row.host == HOST and row.pid is not None
        # Our own pid: this process runs one sync at a time, so an older run of ours is over.
        gone = on_this_host and (row.pid == os.getpid() or not pid_alive(row.pid))
        if gone or last_seen < stale_before:
            dead.append(int(row.id))
    return dead


DEAD_RUN_REASON = "left running by a process that stopped"


def abort_dead(connection: Connection, now: datetime, *, stale_after_s: float) -> list[int]:
    """Close the runs whose process died as `aborted`, and free the accounts it had leased."""
    dead = runs.abort_runs(
        connection, dead_runs(connection, now, stale_after_s=stale_after_s), now, DEAD_RUN_REASON
    )
    if dead:
        owners = select(sync_runs.c.worker_id).where(
            sync_runs.c.id.in_(dead), sync_runs.c.worker_id.is_not(None)
        )
        claims.release_owned_by(connection, owners)
        for run_id in dead:
            log.warning("run.aborted_found", dead_run_id=run_id, reason=DEAD_RUN_REASON)
    return dead


class Heartbeat:
    """A background thread that beats every `interval_s` until stopped (for `trakt-etl sync`;
    the daemon beats from its scheduler instead, so that a stuck scheduler goes stale)."""

    def __init__(
        self,
        engine: Engine,
        worker_id: int,
        *,
        interval_s: float = DEFAULT_HEARTBEAT_S,
        clock: Callable[[], datetime],
    ) -> None:
        self._engine = engine
        self._worker_id = worker_id
        self._interval_s = interval_s
        self._clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                with self._engine.begin() as connection:
                    beat(
                        connection,
                        self._worker_id,
                        self._clock(),
                        lease_s=stale_after(self._interval_s),
                    )
            except SQLAlchemyError as exc:
                log.warning("heartbeat.failed", error=str(getattr(exc, "orig", exc)))
