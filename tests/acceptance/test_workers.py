"""Several workers, one database (CONTRACT guarantee 8), with real processes and signals.

PostgreSQL: three `trakt-etl daemon` processes share the accounts through due windows and
leases (`etl.claims`): each account is synced exactly once per schedule window, whichever
worker does it. A worker killed with kill -9 on the others' host loses nobody's sync for longer
than it takes another worker to start its next run (they see its pid is gone); one on another
host (`TRAKT_ETL_WORKER_HOST`) keeps its accounts until its heartbeat is stale and its leases
run out, and not a moment less. SQLite: a second concurrent `trakt-etl sync` is refused at once
with a message naming the holder, or queues behind it with --wait.

Schedule windows are aligned to the epoch (`claims.next_window`), so the tests bucket the
`account_syncs` rows by window. The daemons are started just after a window boundary: their
runs then start early in each window and end well before the next, so that a row's own
`started_at` falls in the window of the run that wrote it.
"""

from __future__ import annotations

import math
import signal
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import Engine, select, text

from etl import claims, liveness
from etl.fakeapi import FakeTrakt
from etl.models import account_syncs, accounts, sync_runs
from tests.acceptance.test_daemon import (
    TRAKT_ETL,
    DaemonProcess,
    _environment,
    assert_history_guarantees,
    assert_run_atomic,
    daemon,
    daemon_config,
    engine_for,
    runs_by_id,
    write_config,
)

pytestmark = pytest.mark.acceptance

T = TypeVar("T")
PERIOD_S = 8.0
HEARTBEAT_S = 1.0
SCHEDULE = {"interval": "8s", "jitter_s": 0, "heartbeat_s": HEARTBEAT_S, "run_timeout_s": 30}
# How long a dead worker on another host keeps its accounts: its heartbeat goes stale, and its
# leases (renewed by that heartbeat) run out, this long after its last beat (60 s at least).
STALE_AFTER_S = liveness.stale_after(HEARTBEAT_S)
HISTORY_KEYS = {
    "profile_history": ("account_id",),
    "connection_history": ("account_id", "network"),
    "sharing_text_history": ("account_id", "action"),
}


# --- windows -----------------------------------------------------------------------------------


def window_of(moment: datetime) -> int:
    """The index of the epoch-aligned schedule window `moment` falls in."""
    return math.floor((moment - claims.EPOCH).total_seconds() / PERIOD_S)


def window_start(index: int) -> datetime:
    return claims.EPOCH + timedelta(seconds=index * PERIOD_S)


def current_window() -> int:
    return window_of(datetime.now(UTC))


def sleep_until(moment: datetime) -> None:
    time.sleep(max(0.0, (moment - datetime.now(UTC)).total_seconds()))


def begin_early_in_a_window(latest_s: float = 0.3) -> None:
    """Return just after a window boundary (at once if this window began < `latest_s` ago)."""
    now = datetime.now(UTC)
    if (now - window_start(window_of(now))).total_seconds() > latest_s:
        sleep_until(claims.next_window(now, PERIOD_S) + timedelta(seconds=0.02))


# --- processes ---------------------------------------------------------------------------------


class SyncProcess(DaemonProcess):
    """One `trakt-etl sync` subprocess and its JSON log file (the daemon helper's polling)."""

    def __init__(self, config: Path, log: Path, *extra: str) -> None:
        self.log_path = log
        self._log = log.open("wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [*TRAKT_ETL, "sync", "-c", str(config), *extra],
            cwd=config.parent,
            env=_environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`trakt-etl sync` did not exit within {timeout}s:\n" + self.tail())


class DaemonElsewhere(DaemonProcess):
    """A `trakt-etl daemon` that records `host` as its host (`TRAKT_ETL_WORKER_HOST`): to the
    others it runs on another machine, whose pids they cannot see."""

    def __init__(self, config: Path, log: Path, host: str) -> None:
        self.log_path = log
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            [*TRAKT_ETL, "daemon", "-c", str(config)],
            cwd=config.parent,
            env={**_environment(), liveness.WORKER_HOST_ENV: host},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )


@contextmanager
def daemon_elsewhere(config: Path, log: Path, host: str) -> Iterator[DaemonProcess]:
    process = DaemonElsewhere(config, log, host)
    try:
        yield process
    finally:
        process.kill()


@contextmanager
def sync_command(config: Path, log: Path, *extra: str) -> Iterator[SyncProcess]:
    process = SyncProcess(config, log, *extra)
    try:
        yield process
    finally:
        process.kill()


def poll(
    what: str,
    condition: Callable[[], T | None],
    *,
    timeout: float,
    watch: Sequence[DaemonProcess] = (),
) -> T:
    """Poll `condition` until it gives something truthy; fail if a watched process exits."""
    deadline = time.monotonic() + timeout
    while True:
        found = condition()
        if found:
            return found
        for process in watch:
            if not process.alive():
                pytest.fail(
                    f"a worker exited ({process.proc.returncode}) while waiting for {what}:\n"
                    + process.tail()
                )
        if time.monotonic() > deadline:
            tails = "\n---\n".join(process.tail(15) for process in watch)
            pytest.fail(f"timed out after {timeout}s waiting for {what}\n{tails}")
        time.sleep(0.1)


@dataclass(frozen=True)
class Killed:
    run_id: int
    worker_id: int
    at: datetime
    orphans: set[int]  # the accounts it held leased when it died
    leases_until: datetime  # when the first of those leases runs out


def kill_holding_claims(victim: DaemonProcess, engine: Engine) -> Killed:
    """kill -9 `victim` in its first run, once it has synced an account and still holds others."""
    run_id = int(victim.wait_event("account.synced", timeout=30)["run_id"])
    assert victim.stop(signal.SIGKILL, timeout=10) == -signal.SIGKILL
    killed_at = datetime.now(UTC)
    with engine.connect() as connection:
        worker_id = connection.execute(
            select(sync_runs.c.worker_id).where(sync_runs.c.id == run_id)
        ).scalar_one()
        leases = dict(
            connection.execute(
                select(accounts.c.id, accounts.c.lease_expires_at).where(
                    accounts.c.lease_owner == worker_id
                )
            )
            .tuples()
            .all()
        )
    assert leases, "the worker was killed after its run had written all it claimed"
    return Killed(run_id, worker_id, killed_at, set(leases), min(leases.values()))


# --- what the database says --------------------------------------------------------------------


def sync_rows(engine: Engine) -> list[Any]:
    """Every account_syncs row with the pid and worker of its run."""
    query = select(
        account_syncs.c.account_id,
        account_syncs.c.run_id,
        account_syncs.c.started_at,
        account_syncs.c.status,
        account_syncs.c.changed,
        sync_runs.c.pid,
        sync_runs.c.worker_id,
    ).join(sync_runs, sync_runs.c.id == account_syncs.c.run_id)
    with engine.connect() as connection:
        return list(connection.execute(query))


def rows_by_window(rows: Sequence[Any]) -> dict[int, Counter[int]]:
    """window index -> how many account_syncs rows each account has in it."""
    found: dict[int, Counter[int]] = defaultdict(Counter)
    for row in rows:
        found[window_of(row.started_at)][row.account_id] += 1
    return found


def account_ids_by_name(engine: Engine) -> dict[str, int]:
    with engine.connect() as connection:
        return dict(connection.execute(select(accounts.c.username, accounts.c.id)).tuples().all())


def synced_since(engine: Engine, moment: datetime) -> set[int]:
    """Accounts with an ok account_syncs row started at `moment` or later."""
    query = select(account_syncs.c.account_id).where(
        account_syncs.c.status == "ok", account_syncs.c.started_at >= moment
    )
    with engine.connect() as connection:
        return set(connection.execute(query).scalars())


def synced_in(engine: Engine, window: int) -> set[int]:
    """Accounts with an ok account_syncs row started in `window`."""
    query = select(account_syncs.c.account_id).where(
        account_syncs.c.status == "ok",
        account_syncs.c.started_at >= window_start(window),
        account_syncs.c.started_at < window_start(window + 1),
    )
    with engine.connect() as connection:
        return set(connection.execute(query).scalars())


def assert_no_duplicates(engine: Engine) -> None:
    """No overlapping validity for one key, no change event recorded twice, SCD2 holds."""
    assert_history_guarantees(engine)
    with engine.connect() as connection:
        for table, key in HISTORY_KEYS.items():
            same_key = " AND ".join(f"a.{column} = b.{column}" for column in key)
            overlapping = connection.execute(
                text(
                    f"SELECT a.id, b.id FROM {table} a JOIN {table} b ON {same_key} "
                    "AND a.id < b.id "
                    "AND (b.valid_to IS NULL OR a.valid_from < b.valid_to) "
                    "AND (a.valid_to IS NULL OR b.valid_from < a.valid_to)"
                )
            ).all()
            assert overlapping == [], f"{table}: rows of one key with overlapping validity"
        twice = connection.execute(
            text(
                "SELECT account_id, entity, entity_key, field, change, run_id, COUNT(*) "
                "FROM change_events "
                "GROUP BY account_id, entity, entity_key, field, change, run_id "
                "HAVING COUNT(*) > 1"
            )
        ).all()
        assert twice == [], f"change events recorded twice: {twice[:5]}"
        # The same new value applied twice (by two runs) would be a second sync of one change.
        reapplied = connection.execute(
            text(
                "SELECT account_id, field, new_value, COUNT(*) FROM change_events "
                "WHERE entity = 'profile' AND change = 'changed' "
                "GROUP BY account_id, field, new_value HAVING COUNT(*) > 1"
            )
        ).all()
        assert reapplied == [], f"one change recorded by more than one run: {reapplied[:5]}"


def locations(engine: Engine) -> dict[str, str]:
    with engine.connect() as connection:
        return dict(
            connection.execute(text("SELECT username, location FROM profiles_current"))
            .tuples()
            .all()
        )


# --- tests -------------------------------------------------------------------------------------


@pytest.mark.postgres
def test_three_daemons_on_postgres__each_account_synced_once_per_window_and_work_shared(
    tmp_path: Path, fake_api: FakeTrakt, postgres_url: str
) -> None:
    """Three daemons on one PostgreSQL: each account synced exactly once per window, shared."""
    users = fake_api.add_generated(300)
    fake_api.latency_s = 0.01
    data = daemon_config(
        fake_api, postgres_url, users, api={"concurrency": 4}, schedule=dict(SCHEDULE)
    )
    config = write_config(tmp_path / "config.yaml", data)

    begin_early_in_a_window()
    with ExitStack() as stack, engine_for(postgres_url) as engine:
        workers = [
            stack.enter_context(daemon(config, tmp_path / f"worker{n}.jsonl")) for n in range(3)
        ]
        for worker in workers:
            worker.wait_event("run.finished", timeout=30)
        # The first windows fully covered by the workers' life after their first runs.
        first = current_window() + 1
        counted = [first, first + 1, first + 2]
        for window in [*counted, first + 3]:
            sleep_until(window_start(window))
            poll(
                f"every account synced in window {window}",
                lambda window=window: len(synced_in(engine, window)) == len(users),
                timeout=PERIOD_S + 1,
                watch=workers,
            )
            # All synced for this window: a change now is for the next window's runs.
            for user in users:
                fake_api.set_profile(user, location=f"moved in window {window}")
        last_value = f"moved in window {counted[-1]}"
        # Outlive the last counted window, then stop: the workers' run may be cut short.
        sleep_until(window_start(first + 3) + timedelta(seconds=0.5))
        codes = [worker.stop(signal.SIGTERM, timeout=30) for worker in workers]
        pids = {worker.pid for worker in workers}

        assert codes == [0, 0, 0], [worker.tail(10) for worker in workers]
        ids = account_ids_by_name(engine)
        rows = sync_rows(engine)
        by_window = rows_by_window(rows)
        for window in counted:
            counts = by_window[window]
            missing = sorted(set(ids.values()) - set(counts))
            doubled = {account: n for account, n in counts.items() if n > 1}
            assert missing == [], f"window {window}: accounts not synced: {missing[:10]}"
            assert doubled == {}, f"window {window}: accounts synced more than once: {doubled}"
        in_counted = [row for row in rows if window_of(row.started_at) in counted]
        assert {row.status for row in in_counted} == {"ok"}
        # The work was shared: more than one worker synced accounts, overall and per window.
        workers_that_synced = {row.pid for row in rows}
        assert workers_that_synced <= pids
        assert len(workers_that_synced) > 1, f"only {workers_that_synced} did any work"
        assert len({(row.pid, row.worker_id) for row in in_counted}) > 1
        # The changes made between windows were picked up once each, by one worker each.
        assert all(row.changed for row in in_counted if window_of(row.started_at) != first)
        assert_no_duplicates(engine)
        current = locations(engine)
        assert sorted(current) == sorted(users)
        stale = {user: value for user, value in current.items() if value != last_value}
        assert stale == {}, f"accounts missing the change made before the last window: {stale}"
        runs = runs_by_id(engine).values()
        assert {run.pid for run in runs} == pids
        unfinished = [(r.id, r.status, r.error) for r in runs if r.status not in ("success",)]
        # Only a run cut short by the final SIGTERM may be other than a success.
        assert all(
            status == "aborted" and "SIGTERM" in (error or "") for _, status, error in unfinished
        ), unfinished


@pytest.mark.postgres
def test_worker_killed_holding_claims__others_sync_its_accounts_within_the_lease(
    tmp_path: Path, fake_api: FakeTrakt, postgres_url: str
) -> None:
    """kill -9 of a worker holding claims: the others sync its accounts; its run is aborted."""
    users = fake_api.add_generated(150)
    fake_api.latency_s = 0.05  # 2 at a time: ~40 accounts/s per worker
    data = daemon_config(
        fake_api, postgres_url, users, api={"concurrency": 2}, schedule=dict(SCHEDULE)
    )
    config = write_config(tmp_path / "config.yaml", data)

    begin_early_in_a_window()
    with ExitStack() as stack, engine_for(postgres_url) as engine:
        victim, *survivors = [
            stack.enter_context(daemon(config, tmp_path / f"worker{n}.jsonl")) for n in range(3)
        ]
        killed = kill_holding_claims(victim, engine)
        dead_run, killed_at, orphans = killed.run_id, killed.at, killed.orphans
        kill_window = window_of(killed_at)
        for user in users:  # every account changes: the next window writes a new profile row
            fake_api.set_profile(user, location="after the kill")

        everyone = set(account_ids_by_name(engine).values())
        assert len(everyone) == len(users)

        def all_synced_since_the_kill() -> bool:
            after = synced_in(engine, kill_window) | synced_in(engine, kill_window + 1)
            return after == everyone and orphans <= synced_in(engine, kill_window + 1)

        poll(
            "every account synced in the window of the kill or the next",
            all_synced_since_the_kill,
            timeout=15,
            watch=survivors,
        )
        after_window = kill_window + 1
        poll(
            f"every account synced again in window {after_window}",
            lambda: synced_in(engine, after_window) == everyone,
            timeout=(window_start(after_window + 1) - datetime.now(UTC)).total_seconds() + 1,
            watch=survivors,
        )
        sleep_until(window_start(after_window + 1) + timedelta(seconds=0.3))
        codes = [worker.stop(signal.SIGTERM, timeout=30) for worker in survivors]
        found = [e for worker in survivors for e in worker.events("run.aborted_found")]

        assert codes == [0, 0]
        assert [e["dead_run_id"] for e in found] == [dead_run], found
        runs = runs_by_id(engine)
        assert runs[dead_run].status == "aborted"
        assert runs[dead_run].finished_at is not None
        assert "left running" in (runs[dead_run].error or "")
        assert_run_atomic(engine, dead_run)
        rows = sync_rows(engine)
        survivor_pids = {worker.pid for worker in survivors}
        orphan_rows = [row for row in rows if row.account_id in orphans]
        assert all(row.run_id != dead_run for row in orphan_rows)
        assert {row.pid for row in orphan_rows} <= survivor_pids
        assert all(row.started_at > killed_at for row in orphan_rows)
        # Its pid was seen gone on this host: its accounts did not wait for its leases to run out.
        assert max(row.started_at for row in orphan_rows) < killed.leases_until
        for window, counts in rows_by_window(rows).items():
            doubled = {account: n for account, n in counts.items() if n > 1}
            assert doubled == {}, f"window {window}: accounts synced more than once: {doubled}"
        assert {row.status for row in rows} == {"ok"}
        assert_no_duplicates(engine)
        assert locations(engine) == dict.fromkeys(users, "after the kill")
        live = [r for r in runs.values() if r.status == "running"]
        assert live == [], "a run was left running"


@pytest.mark.postgres
def test_worker_on_another_host_killed__others_sync_its_accounts_once_its_lease_runs_out(
    tmp_path: Path, fake_api: FakeTrakt, postgres_url: str
) -> None:
    """kill -9 of a worker on another host (its pid out of the others' sight): its accounts wait
    until its heartbeat is stale and its leases run out, then the others sync them; its run is
    aborted once."""
    users = fake_api.add_generated(150)
    fake_api.latency_s = 0.05  # 2 at a time: ~40 accounts/s per worker
    data = daemon_config(
        fake_api, postgres_url, users, api={"concurrency": 2}, schedule=dict(SCHEDULE)
    )
    config = write_config(tmp_path / "config.yaml", data)

    begin_early_in_a_window()
    with ExitStack() as stack, engine_for(postgres_url) as engine:
        victim = stack.enter_context(
            daemon_elsewhere(config, tmp_path / "victim.jsonl", "another-host")
        )
        survivors = [
            stack.enter_context(daemon(config, tmp_path / f"worker{n}.jsonl")) for n in range(2)
        ]
        killed = kill_holding_claims(victim, engine)
        for user in users:
            fake_api.set_profile(user, location="after the kill")
        # Its last beat was at most a beat (and some scheduling delay) before the kill.
        not_before = killed.at + timedelta(seconds=STALE_AFTER_S - 5)
        poll(
            "the dead worker's accounts synced by the others",
            lambda: killed.orphans <= synced_since(engine, killed.at),
            timeout=STALE_AFTER_S + 3 * PERIOD_S,
            watch=survivors,
        )
        codes = [worker.stop(signal.SIGTERM, timeout=30) for worker in survivors]
        found = [e for worker in survivors for e in worker.events("run.aborted_found")]

    assert codes == [0, 0]
    assert [e["dead_run_id"] for e in found] == [killed.run_id], found
    with engine_for(postgres_url) as engine:
        runs = runs_by_id(engine)
        dead = runs[killed.run_id]
        assert (dead.status, "left running" in (dead.error or "")) == ("aborted", True)
        assert dead.finished_at >= not_before, "the run was judged dead before it went stale"
        with engine.connect() as connection:
            hosts = dict(connection.execute(text("SELECT id, host FROM workers")).tuples().all())
        assert hosts[killed.worker_id] == "another-host"
        assert_run_atomic(engine, killed.run_id)
        rows = sync_rows(engine)
        orphan_rows = [row for row in rows if row.account_id in killed.orphans]
        assert {row.pid for row in orphan_rows} <= {worker.pid for worker in survivors}
        taken_over = min(row.started_at for row in orphan_rows)
        after_s = (taken_over - killed.at).total_seconds()
        assert taken_over >= not_before, f"taken over {after_s:.1f}s after the kill"
        assert taken_over > killed.leases_until, "taken while its leases ran"
        for window, counts in rows_by_window(rows).items():
            doubled = {account: n for account, n in counts.items() if n > 1}
            assert doubled == {}, f"window {window}: accounts synced more than once: {doubled}"
        assert {row.status for row in rows} == {"ok"}
        assert_no_duplicates(engine)
        assert locations(engine) == dict.fromkeys(users, "after the kill")
        assert [r.id for r in runs.values() if r.status == "running"] == []
        cut_short = [r for r in runs.values() if r.status == "aborted" and r.id != killed.run_id]
        assert all("SIGTERM" in (r.error or "") for r in cut_short), cut_short


def test_two_syncs_on_one_sqlite_file__second_refused_at_once_or_waits_with_wait(
    tmp_path: Path, fake_api: FakeTrakt
) -> None:
    """SQLite: a second `sync` exits 3 at once naming the holder's pid; with --wait it queues."""
    users = fake_api.add_generated(60)
    fake_api.latency_s = 0.2  # 60 accounts, 2 at a time: ~6 s a run
    db_url = f"sqlite:///{tmp_path / 'etl.db'}"
    data = daemon_config(fake_api, db_url, users, api={"concurrency": 2})
    config = write_config(tmp_path / "config.yaml", data)

    with ExitStack() as stack:
        first = stack.enter_context(sync_command(config, tmp_path / "first.jsonl"))
        first.wait_event("run.started", timeout=30)
        second = stack.enter_context(sync_command(config, tmp_path / "second.jsonl"))
        refused_code = second.wait_exit(timeout=15)
        refused_after = time.monotonic() - second.started
        first_still_running = first.alive()
        refused = second.events("command.failed")
        first_code = first.wait_exit(timeout=30)
        first_pid = first.pid

    assert first_still_running, "the first sync ended before the second was refused"
    assert refused_code == 3, second.tail()
    assert refused_after < 5, f"the refusal took {refused_after:.1f}s"
    assert len(refused) == 1, second.tail()
    message = refused[0]["error"]
    assert f"pid {first_pid}" in message
    assert "--wait" in message
    assert first_code == 0, first.tail()
    assert second.events("run.started") == []

    for number, user in enumerate(users):
        fake_api.set_profile(user, location=f"Moved {number}")
    with ExitStack() as stack:
        leader = stack.enter_context(sync_command(config, tmp_path / "leader.jsonl"))
        leader.wait_event("run.started", timeout=30)
        queued = stack.enter_context(sync_command(config, tmp_path / "queued.jsonl", "--wait"))
        time.sleep(1.0)
        assert queued.alive(), "`sync --wait` did not wait:\n" + queued.tail()
        assert queued.events("run.started") == [], "`sync --wait` ran alongside the other"
        leader_code = leader.wait_exit(timeout=30)
        leader_done = time.monotonic()
        queued_code = queued.wait_exit(timeout=30)
        leader_run = leader.events("run.finished")
        queued_run = queued.events("run.finished")

    assert leader_code == 0, leader.tail()
    assert queued_code == 0, queued.tail()
    assert time.monotonic() >= leader_done
    assert [e["status"] for e in leader_run] == ["success"]
    assert [e["status"] for e in queued_run] == ["success"]
    with engine_for(db_url) as engine:
        runs = runs_by_id(engine)
        assert len(runs) == 3, "the refused sync must not have opened a run"
        before, after = runs[leader_run[0]["run_id"]], runs[queued_run[0]["run_id"]]
        assert before.finished_at is not None
        assert after.started_at >= before.finished_at, "the waiting sync did not wait"
        assert {run.status for run in runs.values()} == {"success"}
        rows = sync_rows(engine)
        per_run = Counter(row.run_id for row in rows)
        assert per_run[before.id] == per_run[after.id] == len(users)
        assert {row.status for row in rows} == {"ok"}
        # The leader recorded the moves; the queued run found nothing new.
        assert all(row.changed for row in rows if row.run_id == before.id)
        assert not any(row.changed for row in rows if row.run_id == after.id)
        assert_no_duplicates(engine)
        assert locations(engine) == {user: f"Moved {n}" for n, user in enumerate(users)}
        with engine.connect() as connection:
            profile_rows = connection.execute(
                text("SELECT COUNT(*) FROM profile_history")
            ).scalar_one()
    assert profile_rows == 2 * len(users)
