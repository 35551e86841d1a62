"""Telling dead runs from live ones, and ending runs early, against real databases."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, insert, select, text

from etl import liveness
from etl.client import TraktClient
from etl.fakeapi import FakeTrakt, Fault
from etl.models import sync_runs
from etl.ratelimit import RequestGate
from etl.sync import RunControl, Syncer
from tests.conftest import ConfigFactory

pytestmark = pytest.mark.integration

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def a_dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def add_run(engine: Engine, **values: object) -> int:
    row = {"started_at": NOW - timedelta(minutes=5), "status": "running", "trigger": "schedule"}
    with engine.begin() as connection:
        key = connection.execute(insert(sync_runs).values({**row, **values})).inserted_primary_key
    assert key is not None
    return int(key[0])


def test_dead_runs__by_pid_here_and_by_heartbeat_anywhere(engine: Engine) -> None:
    """A run is dead when its local pid is gone or its heartbeat is stale; live ones are kept."""
    fresh = NOW - timedelta(seconds=10)
    old = NOW - timedelta(minutes=10)
    here = liveness.HOST
    dead_pid = add_run(engine, host=here, pid=a_dead_pid(), heartbeat_at=fresh)
    live_pid = add_run(engine, host=here, pid=os.getppid(), heartbeat_at=fresh)
    stale_elsewhere = add_run(engine, host="other-host", pid=1, heartbeat_at=old)
    fresh_elsewhere = add_run(engine, host="other-host", pid=1, heartbeat_at=fresh)
    never_beat = add_run(engine, host=None, pid=None, heartbeat_at=None)

    with engine.connect() as connection:
        dead = liveness.dead_runs(connection, NOW, stale_after_s=60)

    assert sorted(dead) == sorted([dead_pid, stale_elsewhere, never_beat])
    assert live_pid not in dead
    assert fresh_elsewhere not in dead


def test_abort_dead__two_workers_at_once_close_and_report_a_dead_run_once(
    engine: Engine,
) -> None:
    """Two workers finding the same dead run at once: one closes it, the other sees it closed."""
    dead = add_run(engine, host=liveness.HOST, pid=a_dead_pid(), heartbeat_at=NOW)
    found: dict[str, list[int]] = {}
    second = threading.Thread(target=lambda: found.update(second=abort_in_new_transaction()))

    def abort_in_new_transaction() -> list[int]:
        with engine.begin() as connection:
            return liveness.abort_dead(connection, NOW, stale_after_s=60)

    with engine.begin() as connection:
        found["first"] = liveness.abort_dead(connection, NOW, stale_after_s=60)
        second.start()  # its UPDATE waits for this transaction's row lock (or SQLite's)
        second.join(timeout=0.5)
    second.join(timeout=30)

    assert found == {"first": [dead], "second": []}
    with engine.connect() as connection:
        status = connection.execute(
            select(sync_runs.c.status).where(sync_runs.c.id == dead)
        ).scalar_one()
    assert status == "aborted"


def test_worker_heartbeat__refreshes_worker_and_its_running_run(engine: Engine) -> None:
    """beat() moves the worker's heartbeat and that of the run it is running."""
    with engine.begin() as connection:
        worker = liveness.register_worker(connection, kind="daemon", now=NOW)
    run = add_run(engine, worker_id=worker, heartbeat_at=NOW)
    later = NOW + timedelta(seconds=15)

    with engine.begin() as connection:
        liveness.beat(connection, worker, later)

    with engine.connect() as connection:
        beat_run = connection.execute(
            select(sync_runs.c.heartbeat_at).where(sync_runs.c.id == run)
        ).scalar_one()
        row = connection.execute(text("SELECT current_run_id, state FROM workers")).one()
    assert beat_run == later
    assert tuple(row) == (run, "running")


def test_stop__ends_the_run_aborted_with_every_account_whole(
    engine: Engine, make_config: ConfigFactory, fake_api: FakeTrakt
) -> None:
    """A stop mid-run commits what was written, leaves the rest untouched, closes `aborted`."""
    users = fake_api.add_generated(40)
    fake_api.latency_s = 0.05
    config = make_config(users, concurrency=2)
    control = RunControl()
    client = TraktClient(config.api, gate=RequestGate(10_000, stop=control.stop))
    timer = threading.Timer(0.4, control.request_stop, args=("stopped by a test",))
    timer.start()
    summary = Syncer(engine, config, client, control=control).run()
    client.close()

    assert summary.status == "aborted"
    assert 0 < summary.counts.total < 40
    with engine.connect() as connection:
        run = connection.execute(text("SELECT status, error FROM sync_runs")).one()
        synced = connection.execute(text("SELECT COUNT(*) FROM account_syncs")).scalar_one()
        profiles = connection.execute(text("SELECT COUNT(*) FROM profile_history")).scalar_one()
    assert run.status == "aborted"
    assert "stopped by a test" in run.error
    assert synced == profiles == summary.counts.total


def test_deadline__ends_a_run_held_by_a_hung_request(
    engine: Engine, make_config: ConfigFactory, fake_api: FakeTrakt
) -> None:
    """A request held past the run deadline does not hold the run: it ends at the deadline."""
    users = fake_api.add_generated(5)
    fake_api.inject(users[0], Fault.delay(20))
    config = make_config(users, timeout_s=30)
    control = RunControl(deadline_s=1.0)
    client = TraktClient(config.api, gate=RequestGate(10_000, stop=control.stop))
    started = datetime.now(UTC)
    summary = Syncer(engine, config, client, control=control).run()
    elapsed = (datetime.now(UTC) - started).total_seconds()
    fake_api.clear_faults()

    assert summary.status == "aborted"
    assert summary.counts.succeeded == 4
    assert elapsed < 5
    with engine.connect() as connection:
        error = connection.execute(text("SELECT error FROM sync_runs")).scalar_one()
    assert "deadline" in error
