"""`trakt-etl sync` on fetch processes, as operators see it: signals and kill -9 of the command.

Fetch processes never outlive the sync that started them, however it ends, and they never leave
an account half-written: they do not write at all.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from etl.fakeapi import FakeTrakt
from tests.acceptance.test_daemon import (
    assert_history_guarantees,
    assert_run_atomic,
    daemon_config,
    engine_for,
    run_cli,
    runs_by_id,
    write_config,
)
from tests.acceptance.test_workers import SyncProcess, sync_command
from tests.conftest import fetch_processes_of

pytestmark = pytest.mark.acceptance


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def started_sync(tmp_path: Path, fake: FakeTrakt, name: str) -> tuple[Path, str]:
    users = fake.add_generated(300)
    fake.latency_s = 0.05  # 300 accounts, 4 at a time: ~4 s a run
    db_url = f"sqlite:///{tmp_path / 'etl.db'}"
    data = daemon_config(fake, db_url, users, api={"concurrency": 4, "fetch_processes": 2})
    return write_config(tmp_path / f"{name}.yaml", data), db_url


def wait_for_fetch_processes(process: SyncProcess) -> list[int]:
    process.wait_event("account.synced", timeout=30)
    found = fetch_processes_of(process.pid)
    assert len(found) == 2, process.tail()
    return found


def test_kill_9_of_the_sync__its_fetch_processes_exit_and_the_next_run_cleans_up(
    tmp_path: Path, fake_api: FakeTrakt
) -> None:
    """kill -9 mid-run: the fetch processes go too; the next sync aborts the dead run."""
    config, db_url = started_sync(tmp_path, fake_api, "config")
    with sync_command(config, tmp_path / "killed.jsonl") as killed:
        workers = wait_for_fetch_processes(killed)
        dead_run = killed.events("run.started")[0]["run_id"]
        killed.proc.kill()
        killed.wait_exit(timeout=10)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(pid) for pid in workers), "fetch processes outlived their sync"

    fake_api.latency_s = 0
    finished = run_cli(["sync", "-c", str(config)], cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr
    with engine_for(db_url) as engine:
        runs = runs_by_id(engine)
        assert runs[dead_run].status == "aborted"
        assert [run.status for run in runs.values() if run.id != dead_run] == ["success"]
        assert_run_atomic(engine, dead_run)
        assert_history_guarantees(engine)


def test_sigterm_of_the_sync__ends_the_run_cleanly_with_its_fetch_processes(
    tmp_path: Path, fake_api: FakeTrakt
) -> None:
    """SIGTERM mid-run: writes in flight commit, the run closes aborted, exit status 1."""
    config, db_url = started_sync(tmp_path, fake_api, "config")
    with sync_command(config, tmp_path / "stopped.jsonl") as stopped:
        workers = wait_for_fetch_processes(stopped)
        stopped.proc.send_signal(signal.SIGTERM)
        code = stopped.wait_exit(timeout=30)
        run_id = stopped.events("run.started")[0]["run_id"]
        finished = stopped.events("run.finished")

    assert code == 1, stopped.tail()
    assert [event["status"] for event in finished] == ["aborted"]
    assert not any(alive(pid) for pid in workers)
    with engine_for(db_url) as engine:
        run = runs_by_id(engine)[run_id]
        assert run.status == "aborted"
        assert "SIGTERM" in (run.error or "")
        assert 0 < run.accounts_succeeded < 300
        assert_run_atomic(engine, run_id)
        assert_history_guarantees(engine)
