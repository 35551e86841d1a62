"""`trakt-etl daemon` as operators run it: a real process, real signals, real databases.

Each test starts `python -m etl daemon -c CONFIG` as a subprocess with its JSON log on stderr
going to a file, which the test reads to follow what the daemon does; the fake trakt API runs
in the test process. Every daemon is killed in a `finally`, whatever happens.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any, TypeVar

import pytest
import yaml
from sqlalchemy import Connection, Engine, make_url, select, text

from etl.fakeapi import DEFAULT_API_KEY, FakeTrakt, Fault, password_for
from etl.models import sync_runs
from tests.conftest import engine_for, healthz

pytestmark = pytest.mark.acceptance

TRAKT_ETL = [sys.executable, "-m", "etl"]
T = TypeVar("T")


# --- helpers ---------------------------------------------------------------------------------


def _environment() -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TRAKT_ETL_")}
    environment["PYTHONUNBUFFERED"] = "1"
    return environment


def daemon_config(
    fake: FakeTrakt,
    db_url: str,
    users: Sequence[str],
    *,
    api: dict[str, Any] | None = None,
    schedule: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "database": {"url": db_url},
        "api": {
            "base_url": fake.base_url,
            "api_key": DEFAULT_API_KEY,
            "timeout_s": 5,
            "max_requests_per_s": 10_000,
            "backoff_initial_s": 0.01,
            "backoff_max_s": 0.05,
            **(api or {}),
        },
        "schedule": {"interval": "2s", "jitter_s": 0, "heartbeat_s": 1, **(schedule or {})},
        "logging": {"format": "json"},
        "accounts": [{"username": u, "password": password_for(u)} for u in users],
    }


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def run_cli(args: Sequence[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TRAKT_ETL, *args],
        cwd=cwd,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class DaemonProcess:
    """One `trakt-etl daemon` subprocess and its JSON log file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.log_path = log
        self._log: IO[bytes] = log.open("wb")
        self.proc = subprocess.Popen(
            [*TRAKT_ETL, "daemon", "-c", str(config)],
            cwd=config.parent,
            env=_environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def events(self, name: str | None = None, **match: Any) -> list[dict[str, Any]]:
        """The complete JSON log lines so far (each with its line number as `_n`), filtered."""
        found: list[dict[str, Any]] = []
        raw = self.log_path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(raw.splitlines(keepends=True)):
            if not line.endswith("\n") or not line.startswith("{"):
                continue  # a line being written, or a stray non-JSON line
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            event["_n"] = number
            if name is not None and event.get("event") != name:
                continue
            if all(event.get(key) == value for key, value in match.items()):
                found.append(event)
        return found

    def tail(self, lines: int = 40) -> str:
        text_ = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text_.splitlines()[-lines:])

    def wait_for(self, what: str, condition: Callable[[], T | None], timeout: float = 20) -> T:
        """Poll `condition` until it gives something truthy; fail if the daemon dies first."""
        deadline = time.monotonic() + timeout
        while True:
            found = condition()
            if found:
                return found
            if not self.alive():
                pytest.fail(
                    f"the daemon exited ({self.proc.returncode}) while waiting for {what}:\n"
                    + self.tail()
                )
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout}s waiting for {what}:\n" + self.tail())
            time.sleep(0.05)

    def wait_event(
        self, name: str, *, after: int = -1, timeout: float = 20, **match: Any
    ) -> dict[str, Any]:
        """The first `name` event past log line `after` with the given keys."""

        def first() -> dict[str, Any] | None:
            found = [e for e in self.events(name, **match) if e["_n"] > after]
            return found[0] if found else None

        return self.wait_for(f"{name} {match} after line {after}", first, timeout)

    def last_line(self) -> int:
        events = self.events()
        return events[-1]["_n"] if events else -1

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 30) -> int:
        """Send `sig` and wait for the exit status."""
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the daemon did not exit within {timeout}s of {sig.name}:\n" + self.tail())

    def kill(self) -> None:
        """Whatever state it is in, make sure the process is gone and the log closed."""
        if self.alive():
            self.proc.kill()
        with suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self._log.close()


@contextmanager
def daemon(config: Path, log: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(config, log)
    try:
        yield process
    finally:
        process.kill()


def runs_by_id(engine: Engine) -> dict[int, Any]:
    with engine.connect() as connection:
        return {row.id: row for row in connection.execute(select(sync_runs))}


def account_ids(engine: Engine, sql: str, **params: Any) -> set[int]:
    with engine.connect() as connection:
        return set(connection.execute(text(sql), params).scalars())


def assert_run_atomic(engine: Engine, run_id: int) -> None:
    """Each account of the run is wholly old or wholly new (CONTRACT guarantee 4)."""
    synced = account_ids(engine, "SELECT account_id FROM account_syncs WHERE run_id = :r", r=run_id)
    ok_changed = account_ids(
        engine,
        "SELECT account_id FROM account_syncs WHERE run_id = :r AND status = 'ok' AND changed",
        r=run_id,
    )
    failed = account_ids(
        engine,
        "SELECT account_id FROM account_syncs WHERE run_id = :r AND status <> 'ok'",
        r=run_id,
    )
    assert failed == set()
    written = {
        table: account_ids(engine, f"SELECT account_id FROM {table} WHERE run_id = :r", r=run_id)
        for table in ("profile_history", "connection_history", "sharing_text_history")
    }
    events = account_ids(engine, "SELECT account_id FROM change_events WHERE run_id = :r", r=run_id)
    payloads = account_ids(
        engine, "SELECT account_id FROM raw_payloads WHERE run_id = :r", r=run_id
    )
    # History rows and change events of this run exist exactly for its changed, ok accounts.
    assert events == ok_changed
    for table, ids in written.items():
        assert ids <= ok_changed, f"{table} has rows of run {run_id} without an ok account_syncs"
    assert set().union(*written.values()) == ok_changed
    # A raw payload of this run only with an ok account_syncs row of this run.
    assert payloads <= synced


def assert_history_guarantees(engine: Engine) -> None:
    """One current row per key, contiguous validity, one current profile per account."""
    keys = {
        "profile_history": "account_id",
        "connection_history": "account_id, network",
        "sharing_text_history": "account_id, action",
    }
    with engine.connect() as connection:
        for table, key in keys.items():
            doubled = connection.execute(
                text(
                    f"SELECT {key}, COUNT(*) FROM {table} WHERE valid_to IS NULL "
                    f"GROUP BY {key} HAVING COUNT(*) > 1"
                )
            ).all()
            assert doubled == [], f"{table}: more than one current row for {doubled}"
            gaps = connection.execute(
                text(
                    f"SELECT id, valid_to, next_from FROM ("
                    f"  SELECT id, valid_to, LEAD(valid_from) OVER ("
                    f"    PARTITION BY {key} ORDER BY valid_from, id) AS next_from"
                    f"  FROM {table}) AS ordered "
                    f"WHERE valid_to IS NOT NULL AND (next_from IS NULL OR next_from <> valid_to)"
                )
            ).all()
            assert gaps == [], f"{table}: closed rows not followed contiguously: {gaps}"
        not_one = connection.execute(
            text(
                "SELECT account_id FROM profile_history GROUP BY account_id "
                "HAVING SUM(CASE WHEN valid_to IS NULL THEN 1 ELSE 0 END) <> 1"
            )
        ).all()
        assert not_one == [], f"accounts without exactly one current profile row: {not_one}"


@contextmanager
def table_locked(url: str, table: str) -> Iterator[Connection]:
    """Hold `LOCK TABLE ... IN ACCESS EXCLUSIVE MODE` (PostgreSQL) in an open transaction until
    the block ends, or until the caller rolls the yielded connection back."""
    with engine_for(url) as engine, engine.connect() as connection:
        connection.begin()
        connection.execute(text(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
        try:
            yield connection
        finally:
            connection.rollback()


def lock_waiters(engine: Engine, table: str) -> int:
    """Sessions waiting for a lock on `table` right now (PostgreSQL)."""
    with engine.connect() as connection:
        return int(
            connection.execute(
                text(
                    "SELECT COUNT(*) FROM pg_locks "
                    "WHERE NOT granted AND relation = CAST(:t AS regclass)"
                ),
                {"t": table},
            ).scalar_one()
        )


class TcpProxy:
    """A loopback TCP forwarder that can be cut (connections dropped, new ones refused)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._cut = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        self._acceptor.start()

    def cut(self) -> None:
        self._cut.set()
        self._drop_all()

    def restore(self) -> None:
        self._cut.clear()

    def close(self) -> None:
        self._closed.set()
        self._acceptor.join(timeout=5)
        self._listener.close()
        self._drop_all()
        for thread in self._threads:
            thread.join(timeout=5)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            if self._cut.is_set():
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                _reset(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                thread = threading.Thread(
                    target=self._pump, args=(source, sink), name="proxy-pump", daemon=True
                )
                self._threads.append(thread)
                thread.start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                for sock in (source, sink):
                    if sock in self._sockets:
                        self._sockets.discard(sock)
                        sock.close()

    def _drop_all(self) -> None:
        with self._lock:
            dropped, self._sockets = self._sockets, set()
        for sock in dropped:
            _reset(sock)


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset: the other end sees the connection fail at once."""
    with suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    with suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


# --- tests -----------------------------------------------------------------------------------


def test_runs_on_schedule_and_never_overlaps(tmp_path: Path, fake_api: FakeTrakt) -> None:
    """Runs longer than the 2 s interval are never overlapped: the due run is skipped, logged."""
    users = fake_api.add_generated(30)
    fake_api.latency_s = 0.2  # 30 accounts, 2 at a time: ~3 s a run
    db_url = f"sqlite:///{tmp_path / 'etl.db'}"
    data = daemon_config(
        fake_api, db_url, users, api={"concurrency": 2}, schedule={"run_timeout_s": 30}
    )
    config = write_config(tmp_path / "config.yaml", data)

    with daemon(config, tmp_path / "daemon.jsonl") as process:
        process.wait_for(
            "three finished runs",
            lambda: len(process.events("run.finished")) >= 3,
            timeout=30,
        )
        assert process.stop() == 0

        finished = process.events("run.finished")
        skipped = process.events("run.skipped")
        missed = process.events("run.missed")

    assert all(e["status"] == "success" for e in finished[:3]), finished
    library_errors = [e["message"] for e in process.events("library.log", level="error")]
    assert skipped or missed, f"a due run was dropped unreported; library errors: {library_errors}"
    assert library_errors == []
    for event in skipped:
        assert event["level"] == "warning"
        assert "previous run is still going" in event["reason"]
    for event in missed:
        assert event["level"] == "warning"
        assert "misfire grace" in event["reason"]
    with engine_for(db_url) as engine:
        rows = sorted(runs_by_id(engine).values(), key=lambda r: r.started_at)
    assert len(rows) >= 3
    for before, after in itertools.pairwise(rows):
        assert before.finished_at is not None
        assert before.finished_at <= after.started_at, f"runs {before.id} and {after.id} overlap"
    *complete, last = rows
    assert all(r.status == "success" for r in complete)
    # The last run was either done or cut short by the SIGTERM that ended the test.
    assert last.status == "success" or (
        last.status == "aborted" and "SIGTERM" in (last.error or "")
    ), (last.status, last.error)


def test_sigterm_mid_run__exits_0_and_leaves_each_account_wholly_old_or_new(
    tmp_path: Path, fake_api: FakeTrakt
) -> None:
    """SIGTERM mid-run: exit 0, the run closed `aborted` for SIGTERM, no account half-written."""
    users = fake_api.add_generated(200)
    fake_api.latency_s = 0.1  # 200 accounts, 4 at a time: ~5 s
    db_url = f"sqlite:///{tmp_path / 'etl.db'}"
    data = daemon_config(
        fake_api, db_url, users, api={"concurrency": 4}, schedule={"run_timeout_s": 60}
    )
    config = write_config(tmp_path / "config.yaml", data)

    with daemon(config, tmp_path / "daemon.jsonl") as process:
        first = process.wait_event("account.synced", timeout=30)
        code = process.stop(signal.SIGTERM, timeout=30)
        finished = process.events("run.finished")

    assert code == 0
    assert [e["status"] for e in finished] == ["aborted"]
    run_id = first["run_id"]
    with engine_for(db_url) as engine:
        run = runs_by_id(engine)[run_id]
        assert run.status == "aborted"
        assert run.finished_at is not None
        assert "SIGTERM" in run.error
        assert_run_atomic(engine, run_id)
        synced = account_ids(
            engine, "SELECT account_id FROM account_syncs WHERE run_id = :r", r=run_id
        )
        # The first sync of an account adds its rows: synced accounts are wholly new...
        for table in ("profile_history", "connection_history", "sharing_text_history"):
            current = account_ids(
                engine,
                f"SELECT account_id FROM {table} WHERE valid_to IS NULL AND run_id = :r",
                r=run_id,
            )
            # ...and the others wholly old: no row at all.
            anywhere = account_ids(engine, f"SELECT account_id FROM {table}")
            assert current == anywhere == synced, table
    assert 0 < len(synced) < len(users), "SIGTERM should have landed in the middle of the run"
    assert run.accounts_succeeded == len(synced)


def test_kill_9_mid_run__next_daemon_aborts_the_dead_run_and_history_holds(
    tmp_path: Path, fake_api: FakeTrakt
) -> None:
    """After kill -9 mid-run, a new daemon marks the dead run aborted and syncs; SCD2 holds."""
    users = fake_api.add_generated(100)
    db_url = f"sqlite:///{tmp_path / 'etl.db'}"
    data = daemon_config(
        fake_api, db_url, users, api={"concurrency": 4}, schedule={"run_timeout_s": 30}
    )
    config = write_config(tmp_path / "config.yaml", data)

    with daemon(config, tmp_path / "first.jsonl") as first:
        done = first.wait_event("run.finished", timeout=30)
        assert done["status"] == "success"
        # Every account changes, and the next run is slow enough (~2.5 s) to be killed in.
        for number, user in enumerate(users):
            fake_api.set_profile(user, location=f"Moved {number}")
        fake_api.latency_s = 0.1
        started = first.wait_event("run.started", after=done["_n"], timeout=10)
        dead_run = started["run_id"]
        first.wait_event("account.synced", after=started["_n"], run_id=dead_run, timeout=10)
        first.stop(signal.SIGKILL, timeout=10)
    assert first.proc.returncode == -signal.SIGKILL
    with engine_for(db_url) as engine:
        assert runs_by_id(engine)[dead_run].status == "running"

    fake_api.latency_s = 0
    with daemon(config, tmp_path / "second.jsonl") as second:
        found = second.wait_event("run.aborted_found", dead_run_id=dead_run, timeout=30)
        assert "left running" in found["reason"]
        finished = second.wait_event("run.finished", timeout=30)
        assert second.stop() == 0

    assert finished["status"] == "success"
    with engine_for(db_url) as engine:
        with engine.connect() as connection:
            written_by_dead = connection.execute(
                text("SELECT COUNT(*) FROM account_syncs WHERE run_id = :r"), {"r": dead_run}
            ).scalar_one()
        # Accounts the dead run finished are done for this schedule window; if the new run
        # starts in the same window it syncs only the rest, in a later one all of them.
        assert finished["succeeded"] in (len(users) - written_by_dead, len(users))
        runs = runs_by_id(engine)
        assert runs[dead_run].status == "aborted"
        assert runs[dead_run].finished_at is not None
        assert "left running" in runs[dead_run].error
        assert runs[finished["run_id"]].status == "success"
        assert_run_atomic(engine, dead_run)
        assert_history_guarantees(engine)
        with engine.connect() as connection:
            closed = connection.execute(
                text("SELECT COUNT(*) FROM profile_history WHERE valid_to IS NOT NULL")
            ).scalar_one()
            locations = dict(
                connection.execute(text("SELECT username, location FROM profiles_current")).all()
            )
    assert closed == len(users), "each account's first profile row was replaced once"
    assert locations == {user: f"Moved {number}" for number, user in enumerate(users)}


@pytest.mark.postgres
def test_postgres_unreachable_for_an_interval__daemon_survives_and_recovers(
    tmp_path: Path, fake_api: FakeTrakt, postgres_url: str
) -> None:
    """PostgreSQL cut for an interval: the run fails and is logged, the daemon goes on, recovers."""
    users = fake_api.add_generated(3)
    real = make_url(postgres_url)
    proxy = TcpProxy((real.host or "127.0.0.1", real.port or 5432))
    try:
        via_proxy = real.set(host="127.0.0.1", port=proxy.port)
        data = daemon_config(fake_api, via_proxy.render_as_string(hide_password=False), users)
        config = write_config(tmp_path / "config.yaml", data)
        with daemon(config, tmp_path / "daemon.jsonl") as process:
            first = process.wait_event("run.finished", timeout=30)
            assert first["status"] == "success"

            cut_at = time.monotonic()
            before_cut = process.last_line()
            proxy.cut()
            failed = process.wait_event("run.failed", after=before_cut, timeout=15)
            time.sleep(max(0.0, 3 - (time.monotonic() - cut_at)))
            before_restore = process.last_line()
            proxy.restore()
            recovered = process.wait_event(
                "run.finished", after=before_restore, status="success", timeout=20
            )
            assert process.alive()
            assert process.stop() == 0
    finally:
        proxy.close()

    assert failed["level"] == "error"
    assert any(word in failed["error"].lower() for word in ("connection", "database"))
    with engine_for(postgres_url) as engine:
        runs = runs_by_id(engine)
    assert runs[first["run_id"]].status == "success"
    assert runs[recovered["run_id"]].status == "success"
    assert runs[recovered["run_id"]].accounts_succeeded == len(users)
    assert all(run.status != "running" for run in runs.values())


def test_sighup__reloads_a_good_config_and_keeps_the_old_one_on_a_bad_one(
    tmp_path: Path, fake_api: FakeTrakt
) -> None:
    """SIGHUP picks up an added account; a broken config is refused, named, and the old kept."""
    users = fake_api.add_generated(3)
    db_url = f"sqlite:///{tmp_path / 'etl.db'}"
    data = daemon_config(fake_api, db_url, users[:2])
    config = write_config(tmp_path / "config.yaml", data)

    with daemon(config, tmp_path / "daemon.jsonl") as process:
        first = process.wait_event("run.finished", timeout=30)
        assert first["total"] == 2

        write_config(config, daemon_config(fake_api, db_url, users))
        process.proc.send_signal(signal.SIGHUP)
        reloaded = process.wait_event("config.reloaded", timeout=10)
        assert reloaded["accounts"] == 3
        added = process.wait_event("account.synced", username=users[2], timeout=15)

        broken = daemon_config(fake_api, db_url, users)
        broken["api"]["timeot_s"] = 3
        write_config(config, broken)
        process.proc.send_signal(signal.SIGHUP)
        refused = process.wait_event("config.reload_failed", timeout=10)
        later = process.wait_event("run.finished", after=refused["_n"], timeout=15)
        assert process.alive()
        assert process.stop() == 0

    assert added["_n"] > reloaded["_n"]
    assert refused["level"] == "error"
    assert "api.timeot_s" in refused["error"]
    assert "unknown key" in refused["error"]
    assert (later["status"], later["total"], later["succeeded"]) == ("success", 3, 3)
    with engine_for(db_url) as engine, engine.connect() as connection:
        current = set(connection.execute(text("SELECT username FROM profiles_current")).scalars())
    assert current == set(users)


def test_status_and_history_json__show_runs_failures_workers_and_changes(
    tmp_path: Path, fake_api: FakeTrakt
) -> None:
    """`status --json` and `history USER --json` report what the daemon did, as JSON."""
    users = fake_api.add_generated(3)
    fake_api.inject(users[1], Fault.http(401))
    original = fake_api.settings(users[0])["profile"]["location"]
    db_url = f"sqlite:///{tmp_path / 'etl.db'}"
    config = write_config(tmp_path / "config.yaml", daemon_config(fake_api, db_url, users))

    with daemon(config, tmp_path / "daemon.jsonl") as process:
        first = process.wait_event("run.finished", timeout=30)
        fake_api.set_profile(users[0], location="X")
        changed = process.wait_event(
            "account.changed", after=first["_n"], username=users[0], timeout=15
        )
        process.wait_event("run.finished", after=changed["_n"], timeout=15)
        status = run_cli(["status", "--json", "-c", str(config)], cwd=tmp_path)
        history = run_cli(["history", users[0], "--json", "-c", str(config)], cwd=tmp_path)
        pid = process.pid
        assert process.stop() == 0
    after = run_cli(["status", "--json", "-c", str(config)], cwd=tmp_path)

    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert first["status"] == "partial"
    finished = [run for run in report["runs"] if run["status"] != "running"]
    assert len(finished) >= 2
    assert [run["id"] for run in report["runs"]] == sorted(
        (run["id"] for run in report["runs"]), reverse=True
    )
    for run in finished:
        assert run["status"] == "partial"
        assert run["trigger"] == "schedule"
        assert (run["accounts_total"], run["accounts_succeeded"], run["accounts_failed"]) == (
            3,
            2,
            1,
        )
        assert run["pid"] == pid
    assert [a["username"] for a in report["failing"]] == [users[1]]
    failing = report["failing"][0]
    assert failing["consecutive_failures"] >= len(finished)
    assert "401" in failing["last_error"]
    daemons = [w for w in report["workers"] if w["kind"] == "daemon"]
    assert len(daemons) == 1
    assert (daemons[0]["pid"], daemons[0]["state"], daemons[0]["stale"]) == (pid, "running", False)
    assert report["accounts_enabled"] == 3

    assert after.returncode == 0, after.stderr
    stopped = [w for w in json.loads(after.stdout)["workers"] if w["kind"] == "daemon"]
    assert [(w["pid"], w["state"]) for w in stopped] == [(pid, "stopped")]

    assert history.returncode == 0, history.stderr
    timeline = json.loads(history.stdout)
    assert timeline["username"] == users[0]
    assert timeline["total_changes"] == len(timeline["changes"])
    assert {c["change"] for c in timeline["changes"] if c["run_id"] == first["run_id"]} == {"added"}
    moved = [c for c in timeline["changes"] if c["field"] == "location"]
    assert moved == [
        {
            "changed_at": moved[0]["changed_at"],
            "run_id": changed["run_id"],
            "entity": "profile",
            "key": None,
            "field": "location",
            "change": "changed",
            "old": original,
            "new": "X",
        }
    ]
    assert timeline["changes"][-1] == moved[0]


def test_hung_request__run_ends_at_its_deadline_and_the_next_starts_on_time(
    tmp_path: Path, fake_api: FakeTrakt
) -> None:
    """A request held past the run deadline: the run ends on time and the next starts on time."""
    users = fake_api.add_generated(3)
    fake_api.inject(users[0], Fault.delay(60, times=1))
    db_url = f"sqlite:///{tmp_path / 'etl.db'}"
    data = daemon_config(
        fake_api,
        db_url,
        users,
        api={"timeout_s": 30},
        schedule={"interval": "4s", "run_timeout_s": 3},
    )
    config = write_config(tmp_path / "config.yaml", data)

    with daemon(config, tmp_path / "daemon.jsonl") as process:
        hung = process.wait_event("run.finished", timeout=30)
        fake_api.clear_faults()
        following = process.wait_event("run.finished", after=hung["_n"], timeout=15)
        held_synced = process.events("account.synced", username=users[0])
        assert process.stop() == 0

    assert hung["status"] == "aborted"
    assert hung["succeeded"] == 2
    assert following["status"] == "success"
    assert [e["run_id"] for e in held_synced] == [following["run_id"]]
    with engine_for(db_url) as engine:
        runs = runs_by_id(engine)
    first, second = runs[hung["run_id"]], runs[following["run_id"]]
    assert first.status == "aborted"
    assert "deadline" in first.error
    assert first.finished_at is not None
    assert (first.finished_at - first.started_at).total_seconds() < 6
    assert second.status == "success"
    assert 0 < (second.started_at - first.started_at).total_seconds() <= 4 + 2
    assert second.started_at >= first.finished_at


@pytest.mark.postgres
def test_postgres_lock_wait__run_ends_at_its_deadline_and_the_next_succeeds(
    tmp_path: Path, fake_api: FakeTrakt, postgres_url: str
) -> None:
    """A write stuck on a table lock is cancelled at the run deadline: the run is closed
    `aborted` naming the deadline, no account is half-written, /healthz stays 200, and once the
    lock is gone the next scheduled run, on time, writes everything."""
    users = fake_api.add_generated(3)
    data = daemon_config(
        fake_api,
        postgres_url,
        users,
        schedule={"interval": "3s", "run_timeout_s": 1.5, "healthz_port": 0},
    )
    config = write_config(tmp_path / "config.yaml", data)

    with daemon(config, tmp_path / "daemon.jsonl") as process:
        port = process.wait_event("daemon.started")["healthz_port"]
        first = process.wait_event("run.finished", timeout=30)
        assert first["status"] == "success"
        assert healthz(port)[0] == 200
        for user in users:  # new bodies: the next run must write history
            fake_api.set_profile(user, location="Moved")
        with table_locked(postgres_url, "profile_history"):
            stuck = process.wait_event("run.finished", after=first["_n"], timeout=15)
            health_while_locked = healthz(port)
        following = process.wait_event("run.finished", after=stuck["_n"], timeout=15)
        cancelled = process.events("run.cancelling_statements")
        assert process.alive()
        assert process.stop() == 0

    assert stuck["status"] == "aborted"
    assert health_while_locked[0] == 200, health_while_locked
    assert cancelled, "the stuck statement was never cancelled"
    assert cancelled[0]["connections"] >= 1
    assert "deadline" in cancelled[0]["reason"]
    assert (following["status"], following["succeeded"]) == ("success", len(users))
    with engine_for(postgres_url) as engine:
        runs = runs_by_id(engine)
        aborted, after = runs[stuck["run_id"]], runs[following["run_id"]]
        assert "deadline of 1.5s passed" in aborted.error
        assert "3 accounts left as they were" in aborted.error
        assert (aborted.finished_at - aborted.started_at).total_seconds() < 1.5 + 1.5
        assert_run_atomic(engine, stuck["run_id"])
        assert_history_guarantees(engine)
        # The next run started on schedule, one interval after the stuck one.
        assert 0 < (after.started_at - aborted.started_at).total_seconds() <= 3 + 1
        with engine.connect() as connection:
            locations = set(
                connection.execute(text("SELECT location FROM profiles_current")).scalars()
            )
            in_stuck_run = connection.execute(
                text("SELECT COUNT(*) FROM account_syncs WHERE run_id = :r"),
                {"r": stuck["run_id"]},
            ).scalar_one()
    assert in_stuck_run == 0
    assert locations == {"Moved"}


@pytest.mark.postgres
def test_sigterm_while_stuck_on_a_lock__exits_0_within_the_bound_with_the_run_closed(
    tmp_path: Path, fake_api: FakeTrakt, postgres_url: str
) -> None:
    """SIGTERM while the run's write waits on a lock its deadline is far from ending: the write
    gets half the 30 s bound to commit, is then cancelled, the run is closed `aborted` and the
    process exits 0 within the bound; /healthz says 503 meanwhile."""
    users = fake_api.add_generated(3)
    data = daemon_config(
        fake_api,
        postgres_url,
        users,
        schedule={"interval": "2s", "run_timeout_s": 120, "healthz_port": 0},
    )
    config = write_config(tmp_path / "config.yaml", data)

    with daemon(config, tmp_path / "daemon.jsonl") as process:
        port = process.wait_event("daemon.started")["healthz_port"]
        first = process.wait_event("run.finished", timeout=30)
        for user in users:
            fake_api.set_profile(user, location="Moved")
        with engine_for(postgres_url) as engine, table_locked(postgres_url, "profile_history"):
            stuck = process.wait_event("run.started", after=first["_n"], timeout=10)
            process.wait_for(
                "the run's write to wait on the lock",
                lambda: lock_waiters(engine, "profile_history"),
                timeout=10,
            )
            signalled = time.monotonic()
            process.proc.send_signal(signal.SIGTERM)
            health = process.wait_for(
                "/healthz to answer 503", lambda: (h := healthz(port))[0] == 503 and h, timeout=5
            )
            code = process.proc.wait(timeout=40)
            took = time.monotonic() - signalled
        finished = process.events("run.finished")

    assert code == 0
    assert 15 <= took < 30, f"exit took {took:.1f}s: the write gets 15 s, the exit 30 s at most"
    assert health[1]["status"] == "stale"
    assert [e["run_id"] for e in finished] == [first["run_id"], stuck["run_id"]]
    assert finished[-1]["status"] == "aborted"
    with engine_for(postgres_url) as engine:
        run = runs_by_id(engine)[stuck["run_id"]]
        assert run.status == "aborted"
        assert run.finished_at is not None
        assert "SIGTERM" in run.error
        assert_run_atomic(engine, stuck["run_id"])
        assert_history_guarantees(engine)
        with engine.connect() as connection:
            locations = set(
                connection.execute(text("SELECT location FROM profiles_current")).scalars()
            )
    assert "Moved" not in locations, "the stuck write was rolled back, its accounts wholly old"


def test_sighup__applies_the_schedule_and_run_timeout_and_keeps_what_needs_a_restart(
    tmp_path: Path, fake_api: FakeTrakt
) -> None:
    """A reload changes the interval and the run deadline from the next run; a new database,
    health port or heartbeat is refused with a warning naming the keys, and the old ones stay."""
    users = fake_api.add_generated(2)
    db_url = f"sqlite:///{tmp_path / 'etl.db'}"
    moved_db = tmp_path / "elsewhere.db"
    schedule = {"interval": "3s", "run_timeout_s": 5, "healthz_port": 0}
    config = write_config(
        tmp_path / "config.yaml", daemon_config(fake_api, db_url, users, schedule=schedule)
    )

    with daemon(config, tmp_path / "daemon.jsonl") as process:
        port = process.wait_event("daemon.started")["healthz_port"]
        first = process.wait_event("run.finished", timeout=30)
        edited = daemon_config(
            fake_api,
            f"sqlite:///{moved_db}",
            users,
            schedule={
                "interval": "1s",
                "run_timeout_s": 7,
                "misfire_grace_s": 9,
                "heartbeat_s": 2,
                "healthz_port": port + 1 if port < 65535 else port - 1,
            },
        )
        write_config(config, edited)
        process.proc.send_signal(signal.SIGHUP)
        partial = process.wait_event("config.reload_partial", after=first["_n"], timeout=10)
        reloaded = process.wait_event("config.reloaded", after=first["_n"], timeout=10)
        # Three runs after the reload: at a 1 s interval, well within the old 3 s.

        def started_since_reload() -> list[int]:
            started = process.events("run.started")
            return [e["run_id"] for e in started if e["_n"] > max(partial["_n"], reloaded["_n"])]

        # At a 1 s interval three runs come well within two of the old 3 s.
        process.wait_for("three runs after the reload", lambda: len(started_since_reload()) >= 3)
        process.wait_event("run.finished", run_id=started_since_reload()[2])
        health = healthz(port)
        assert process.stop() == 0

    assert partial["level"] == "warning"
    assert partial["keys"] == ["database.url", "schedule.healthz_port", "schedule.heartbeat_s"]
    assert (reloaded["run_timeout_s"], reloaded["misfire_grace_s"]) == (7, 9)
    assert health[0] == 200, "still served on the port it started with"
    assert not moved_db.exists(), "the database stays the one the daemon started with"
    with engine_for(db_url) as engine:
        runs = runs_by_id(engine)
    later = [runs[run_id] for run_id in started_since_reload()[:3]]
    for run in later:
        assert (run.deadline_at - run.started_at).total_seconds() == pytest.approx(7, abs=0.5)
    gaps = [(b.started_at - a.started_at).total_seconds() for a, b in itertools.pairwise(later)]
    assert all(0.5 < gap < 1.6 for gap in gaps), gaps
