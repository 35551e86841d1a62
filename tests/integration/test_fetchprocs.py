"""Syncing through fetch processes (api.fetch_processes), with real processes and real HTTP.

Fetch processes must be invisible in the results: the same rows, changes and failures as
fetching on threads, the rate limit shared, a stop abandoning their fetches, and a process that
dies costing only the accounts it held.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from etl import db
from etl.client import TraktClient
from etl.config import Config
from etl.control import RunControl
from etl.fakeapi import FakeTrakt, Fault
from etl.ratelimit import RequestGate
from etl.sync import RunSummary, Syncer
from tests.conftest import ConfigFactory, fetch_processes_of, json_logs

pytestmark = pytest.mark.integration

PROCESSES = 2


def fetch_processes() -> list[int]:
    return fetch_processes_of(os.getpid())


def sync(engine: Engine, config: Config, control: RunControl | None = None) -> RunSummary:
    control = control or RunControl()
    client = TraktClient(config.api, gate=RequestGate(10_000, stop=control.stop))
    try:
        return Syncer(engine, config, client, control=control).run()
    finally:
        client.close()


def table(engine: Engine, sql: str) -> set[tuple[Any, ...]]:
    with engine.connect() as connection:
        return {tuple(row) for row in connection.execute(text(sql))}


CURRENT = {
    "profiles": "SELECT username, full_name, age, location, vip, timezone, ratings_mode "
    "FROM profiles_current",
    "connections": "SELECT username, network, connected, share_tv, share_checkins "
    "FROM connections_current",
    "texts": "SELECT username, action, text FROM sharing_texts_current",
    "events": "SELECT a.username, e.entity, e.entity_key, e.field, e.change, e.new_value "
    "FROM change_events e JOIN accounts a ON a.id = e.account_id",
}


def test_sync_on_fetch_processes__stores_what_threads_store(
    engine: Engine, make_config: ConfigFactory, fake_api: FakeTrakt, tmp_path: Path
) -> None:
    """First sync, unchanged re-sync and a change: the same rows and events either way, and
    an unknown field reported by every run, the unchanged one included."""
    users = fake_api.add_generated(60)
    drifting = fake_api.settings(users[5])
    drifting["badges"] = ["early"]
    fake_api.set_payload(users[5], drifting)
    on_processes = make_config(users, concurrency=4, fetch_processes=PROCESSES)
    threads_engine = db.make_engine(f"sqlite:///{tmp_path / 'threads.db'}")
    db.upgrade(threads_engine)
    on_threads = make_config(users, concurrency=4, fetch_processes=0)

    with json_logs() as first_logs:
        first = sync(engine, on_processes)
    sync(threads_engine, on_threads)
    with json_logs() as unchanged_logs:
        unchanged = sync(engine, on_processes)
    fake_api.set_profile(users[7], location="Porto, Portugal")
    fake_api.remove_network(users[8], "twitter")
    changed = sync(engine, on_processes)
    sync(threads_engine, on_threads)
    sync(threads_engine, on_threads)

    assert (first.status, first.counts.succeeded, first.counts.changed) == ("success", 60, 60)
    assert (unchanged.counts.succeeded, unchanged.counts.changed) == (60, 0)
    assert (changed.counts.succeeded, changed.counts.changed) == (60, 2)
    for name, sql in CURRENT.items():
        assert table(engine, sql) == table(threads_engine, sql), name
    assert table(engine, "SELECT COUNT(*) FROM raw_payloads") == {(62,)}
    for logs in (first_logs, unchanged_logs):
        drift = [e["paths"] for e in logs if e["event"] == "schema.drift"]
        assert drift == [["badges"]]
    assert fetch_processes() == [], "fetch processes outlived their run"
    threads_engine.dispose()


def test_fetch_processes__faults_fail_alone_with_their_kind(
    engine: Engine, make_config: ConfigFactory, fake_api: FakeTrakt
) -> None:
    """Errors come back from the processes with their kind, status and attempts."""
    users = fake_api.add_generated(20)
    fake_api.inject(users[0], Fault.http(401))
    fake_api.inject(users[1], Fault.invalid_json())
    fake_api.inject(users[2], Fault.http(503, times=1))
    fake_api.inject(users[3], Fault.delay(2.0))
    config = make_config(
        users, concurrency=4, fetch_processes=PROCESSES, retries=1, timeout_s=0.5
    )

    summary = sync(engine, config)

    outcomes = {
        row[0]: row[1:]
        for row in table(
            engine,
            "SELECT a.username, s.status, s.error_kind, s.http_status, s.attempts "
            "FROM account_syncs s JOIN accounts a ON a.id = s.account_id",
        )
    }
    assert outcomes[users[0]] == ("failed", "auth", 401, 1)
    assert outcomes[users[1]] == ("failed", "invalid_response", 200, 1)
    assert outcomes[users[2]] == ("ok", None, 200, 2)
    assert outcomes[users[3]] == ("failed", "timeout", None, 2)
    assert all(outcomes[user][0] == "ok" for user in users[4:])
    assert (summary.status, summary.counts.failed) == ("partial", 3)
    assert fake_api.request_count(users[0]) == 1  # not retried, from either process


def busiest_second(stamps: list[float]) -> int:
    stamps = sorted(stamps)
    return max(sum(1 for s in stamps if start <= s < start + 1.0) for start in stamps)


def test_fetch_processes__share_one_rate_limit(
    sqlite_engine: Engine, sqlite_config: ConfigFactory, fake_api: FakeTrakt
) -> None:
    """At 20 requests/s over two processes, 60 accounts take ~3 s, never 20 in a second."""
    users = fake_api.add_generated(60)
    engine = sqlite_engine
    config = sqlite_config(
        users, concurrency=8, fetch_processes=PROCESSES, max_requests_per_s=20
    )

    started = time.monotonic()
    summary = sync(engine, config)
    elapsed = time.monotonic() - started

    assert summary.counts.succeeded == 60
    assert elapsed >= 2.5
    assert busiest_second(fake_api.request_times()) <= 20


def test_fetch_processes__a_pause_the_server_asks_for_holds_every_process(
    sqlite_engine: Engine, sqlite_config: ConfigFactory, fake_api: FakeTrakt
) -> None:
    """A spent budget seen by one process pauses the other too, until the reset."""
    users = fake_api.add_generated(40)
    fake_api.latency_s = 0.02
    spent = {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1"}
    fake_api.inject(users[10], Fault(headers=spent, times=1))
    engine = sqlite_engine
    config = sqlite_config(users, concurrency=2, fetch_processes=PROCESSES)

    summary = sync(engine, config)

    assert summary.counts.succeeded == 40
    (paused_at,) = fake_api.request_times(users[10])
    answered_at = paused_at + fake_api.latency_s
    during = [t for t in fake_api.request_times() if answered_at + 0.05 < t < answered_at + 0.9]
    # At most the request the other process had already sent may arrive in the pause.
    assert len(during) <= 1, during
    assert max(fake_api.request_times()) > answered_at + 0.95


def test_fetch_process_that_dies__fails_its_accounts_and_the_others_sync(
    sqlite_engine: Engine, sqlite_config: ConfigFactory, fake_api: FakeTrakt
) -> None:
    """kill -9 of one fetch process mid-run: its accounts fail as internal, the rest sync."""
    users = fake_api.add_generated(80)
    fake_api.latency_s = 0.05
    engine = sqlite_engine
    config = sqlite_config(users, concurrency=4, fetch_processes=PROCESSES)
    killed: list[int] = []

    def kill_one() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            found = fetch_processes()
            if len(found) == PROCESSES and fake_api.request_count() >= 10:
                os.kill(found[0], signal.SIGKILL)
                killed.append(found[0])
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_one)
    killer.start()
    summary = sync(engine, config)
    killer.join()

    assert killed, "no fetch process to kill"
    failed = table(
        engine,
        "SELECT a.username, s.error_kind, s.error_message FROM account_syncs s "
        "JOIN accounts a ON a.id = s.account_id WHERE s.status = 'failed'",
    )
    assert failed, "the dead process held no accounts"
    assert {kind for _, kind, _ in failed} == {"internal"}
    assert all("fetch process died" in message for *_, message in failed)
    assert summary.counts.succeeded + summary.counts.failed == 80
    assert summary.counts.succeeded >= 80 - 4 * 2 * 2  # at most what the dead one held
    dead = {username for username, *_ in failed}
    profiles = {row[0] for row in table(engine, "SELECT username FROM profiles_current")}
    assert profiles == set(users) - dead  # the failed ones wrote nothing


def test_stop__abandons_the_fetches_in_flight_and_ends_the_processes(
    sqlite_engine: Engine, sqlite_config: ConfigFactory, fake_api: FakeTrakt
) -> None:
    """A stop mid-run: what was fetched commits whole, the rest is untouched, no process stays."""
    users = fake_api.add_generated(100)
    fake_api.latency_s = 0.1
    engine = sqlite_engine
    config = sqlite_config(users, concurrency=4, fetch_processes=PROCESSES)
    control = RunControl()
    threading.Timer(1.0, control.request_stop, args=("stopped by a test",)).start()

    summary = sync(engine, config, control)

    assert summary.status == "aborted"
    assert 0 < summary.counts.total < 100
    synced = table(engine, "SELECT COUNT(*) FROM account_syncs")
    profiles = table(engine, "SELECT COUNT(*) FROM profile_history")
    assert synced == profiles == {(summary.counts.total,)}
    assert fetch_processes() == []
