"""`trakt-etl sync` (cron) stopped by SIGTERM while its write waits on a PostgreSQL lock."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from etl.fakeapi import FakeTrakt
from tests.acceptance.test_daemon import (
    TRAKT_ETL,
    _environment,
    assert_run_atomic,
    daemon_config,
    engine_for,
    lock_waiters,
    runs_by_id,
    table_locked,
    write_config,
)

pytestmark = [pytest.mark.acceptance, pytest.mark.postgres]


def test_sigterm_while_the_write_waits_on_a_lock__the_run_is_closed_within_the_bound(
    tmp_path: Path, fake_api: FakeTrakt, postgres_url: str
) -> None:
    """The write gets half the 30 s bound, is cancelled, and the run is closed `aborted`."""
    users = fake_api.add_generated(3)
    config = write_config(tmp_path / "config.yaml", daemon_config(fake_api, postgres_url, users))
    first = subprocess.run(
        [*TRAKT_ETL, "sync", "-c", str(config)],
        cwd=tmp_path,
        env=_environment(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert first.returncode == 0, first.stderr
    for user in users:
        fake_api.set_profile(user, location="Moved")

    with (
        engine_for(postgres_url) as engine,
        table_locked(postgres_url, "profile_history"),
        (tmp_path / "sync.jsonl").open("wb") as log,
    ):
        sync = subprocess.Popen(
            [*TRAKT_ETL, "sync", "-c", str(config)],
            cwd=tmp_path,
            env=_environment(),
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        try:
            deadline = time.monotonic() + 20
            while not lock_waiters(engine, "profile_history"):
                assert sync.poll() is None, "sync exited before its write waited on the lock"
                assert time.monotonic() < deadline, "the write never waited on the lock"
                time.sleep(0.05)
            signalled = time.monotonic()
            sync.send_signal(signal.SIGTERM)
            code = sync.wait(timeout=40)
            took = time.monotonic() - signalled
        finally:
            sync.kill()
            sync.wait()

    assert code == 1  # CONTRACT: an aborted run is not "all ok"
    assert 15 <= took < 30, f"exit took {took:.1f}s"
    with engine_for(postgres_url) as engine:
        runs = runs_by_id(engine)
        last = runs[max(runs)]
        assert last.status == "aborted"
        assert "SIGTERM" in last.error
        assert_run_atomic(engine, last.id)
        with engine.connect() as connection:
            locations = set(
                connection.execute(text("SELECT location FROM profiles_current")).scalars()
            )
    assert "Moved" not in locations
