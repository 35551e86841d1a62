"""`trakt-etl status` and `history` reports, read from real syncs into SQLite and PostgreSQL."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from rich.console import Console
from sqlalchemy import Engine, insert, select, text

from etl import models
from etl.client import TraktClient
from etl.config import Config
from etl.errors import UsageError
from etl.fakeapi import FakeTrakt, Fault
from etl.report import (
    HistoryReport,
    StatusReport,
    as_json,
    history_report,
    render_history,
    render_status,
    status_report,
)
from etl.sync import RunSummary, Syncer
from tests.conftest import ConfigFactory

pytestmark = pytest.mark.integration

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def sync(engine: Engine, config: Config, **kwargs: Any) -> RunSummary:
    client = TraktClient(config.api)
    try:
        return Syncer(engine, config, client).run(**kwargs)
    finally:
        client.close()


def rows(engine: Engine, sql: str, **params: Any) -> list[dict[str, Any]]:
    with engine.connect() as connection:
        return [dict(r) for r in connection.execute(text(sql), params).mappings()]


def one(engine: Engine, table: str, **where: Any) -> dict[str, Any]:
    """One row read through the Core table, so that timestamps come back as aware UTC."""
    with engine.connect() as connection:
        return dict(
            connection.execute(select(models.metadata.tables[table]).filter_by(**where))
            .mappings()
            .one()
        )


def status(engine: Engine, now: datetime | None = None, **kwargs: Any) -> StatusReport:
    with engine.connect() as connection:
        return status_report(connection, now=now or datetime.now(UTC), **kwargs)


def history(engine: Engine, username: str, **kwargs: Any) -> HistoryReport:
    with engine.connect() as connection:
        return history_report(connection, username, **kwargs)


def attempt_started(engine: Engine, username: str, run_id: int) -> datetime:
    """When an account's attempt in a run started, as account_syncs has it."""
    with engine.connect() as connection:
        started: datetime = connection.execute(
            select(models.account_syncs.c.started_at)
            .join(models.accounts, models.accounts.c.id == models.account_syncs.c.account_id)
            .where(models.accounts.c.username == username, models.account_syncs.c.run_id == run_id)
        ).scalar_one()
    return started


def printed(render: Any, report: Any) -> str:
    out = io.StringIO()
    render(report, Console(file=out, width=120))
    return out.getvalue()


def add_worker(engine: Engine, **values: Any) -> int:
    defaults = {"host": "box", "pid": 4242, "kind": "daemon", "state": "running"}
    with engine.begin() as connection:
        key = connection.execute(
            insert(models.workers).values({**defaults, **values})
        ).inserted_primary_key
    assert key is not None
    return int(key[0])


def test_status_on_an_empty_database__is_empty_and_renders(engine: Engine) -> None:
    """Before any sync the report has no runs, failures or workers, and still prints."""
    report = status(engine, NOW)

    assert (report.runs, report.failing, report.workers) == ((), (), ())
    assert (report.accounts_enabled, report.accounts_disabled, report.generated_at) == (0, 0, NOW)
    assert "No sync runs yet" in printed(render_status, report)


def test_status__lists_runs_newest_first_with_counts_and_duration(
    engine: Engine, make_config: ConfigFactory, fake_api: FakeTrakt
) -> None:
    """Runs come newest first with their counts and duration; a running one has no duration."""
    users = fake_api.add_generated(3)
    first = sync(engine, make_config(users))
    fake_api.inject(users[0], Fault.http(401))
    fake_api.set_profile(users[1], location="Elsewhere")
    second = sync(engine, make_config(users[:2]))  # users[2] leaves the config: disabled
    with engine.begin() as connection:
        running = connection.execute(
            insert(models.sync_runs).values(
                started_at=datetime.now(UTC) + timedelta(seconds=1),
                status="running",
                trigger="schedule",
                accounts_total=2,
            )
        ).inserted_primary_key
    assert running is not None

    report = status(engine)

    assert [r.id for r in report.runs] == [running[0], second.run_id, first.run_id]
    assert [r.status for r in report.runs] == ["running", "partial", "success"]
    assert report.runs[0].duration_s is None
    assert report.runs[0].finished_at is None
    newest, oldest = report.runs[1], report.runs[2]
    assert (
        newest.accounts_total,
        newest.accounts_succeeded,
        newest.accounts_failed,
        newest.accounts_changed,
    ) == (2, 1, 1, 1)
    assert (oldest.accounts_total, oldest.accounts_succeeded, oldest.accounts_changed) == (3, 3, 3)
    stored = one(engine, "sync_runs", id=second.run_id)
    assert (newest.started_at, newest.finished_at) == (stored["started_at"], stored["finished_at"])
    assert newest.duration_s == (stored["finished_at"] - stored["started_at"]).total_seconds()
    assert newest.duration_s is not None
    assert newest.duration_s >= 0
    assert (newest.trigger, newest.host, newest.pid) == ("manual", stored["host"], stored["pid"])
    assert (report.accounts_enabled, report.accounts_disabled) == (2, 1)
    assert [r.id for r in status(engine, runs=1).runs] == [running[0]]


def test_failing_accounts__streak_starts_at_the_first_failure_after_the_last_success(
    engine: Engine, make_config: ConfigFactory, fake_api: FakeTrakt
) -> None:
    """Failing accounts show their streak's length and start, and leave once they succeed."""
    for user in ("justin", "sean", "lara"):
        fake_api.add_account(user)
    config = make_config(["justin", "sean", "lara"])
    fake_api.inject("sean", Fault.http(401))  # fails from its very first attempt
    fake_api.inject("lara", Fault.http(401, times=1))
    run1 = sync(engine, config)  # justin ok, sean failed, lara failed
    fake_api.inject("justin", Fault.http(401))
    run2 = sync(engine, config)  # justin failed, sean failed, lara ok
    fake_api.inject("lara", Fault.http(401))
    run3 = sync(engine, config)  # all three failed

    failing = status(engine).failing

    assert [(f.username, f.consecutive_failures) for f in failing] == [
        ("sean", 3),
        ("justin", 2),
        ("lara", 1),
    ]
    since = {f.username: f.failing_since for f in failing}
    assert since == {
        "sean": attempt_started(engine, "sean", run1.run_id),
        "justin": attempt_started(engine, "justin", run2.run_id),
        "lara": attempt_started(engine, "lara", run3.run_id),  # not its earlier failure in run 1
    }
    for account in failing:
        assert account.last_error is not None
        assert "401" in account.last_error
        stored = one(engine, "accounts", username=account.username)
        assert account.last_attempt_at == stored["last_attempt_at"]

    fake_api.clear_faults("justin")
    sync(engine, config)

    assert [(f.username, f.consecutive_failures) for f in status(engine).failing] == [
        ("sean", 4),
        ("lara", 2),
    ]


def test_failing_account_that_is_disabled__is_not_listed(
    engine: Engine, make_config: ConfigFactory, fake_api: FakeTrakt
) -> None:
    """An account dropped from the config is no longer reported as failing."""
    fake_api.add_account("justin")
    fake_api.add_account("sean")
    fake_api.inject("sean", Fault.http(401))
    sync(engine, make_config(["justin", "sean"]))
    assert [f.username for f in status(engine).failing] == ["sean"]

    sync(engine, make_config(["justin"]))

    assert status(engine).failing == ()


def test_workers__show_heartbeat_age_and_staleness_relative_to_now(engine: Engine) -> None:
    """Running workers are stale past stale_after_s; stopped ones show for an hour, never stale."""
    fresh = add_worker(
        engine,
        started_at=NOW - timedelta(hours=3),
        heartbeat_at=NOW - timedelta(seconds=5),
        current_run_id=7,
    )
    silent = add_worker(
        engine, pid=99, started_at=NOW - timedelta(hours=2), heartbeat_at=NOW - timedelta(minutes=5)
    )
    stopped = add_worker(
        engine,
        kind="sync",
        state="stopped",
        started_at=NOW - timedelta(minutes=20),
        heartbeat_at=NOW - timedelta(minutes=10),
        stopped_at=NOW - timedelta(minutes=10),
    )
    add_worker(  # stopped two hours ago: no longer shown
        engine,
        state="stopped",
        started_at=NOW - timedelta(hours=3),
        heartbeat_at=NOW - timedelta(hours=2),
        stopped_at=NOW - timedelta(hours=2),
    )

    report = status(engine, NOW, stale_after_s=60)

    shown = [(w.id, w.state, w.heartbeat_age_s, w.stale) for w in report.workers]
    assert shown == [
        (fresh, "running", 5.0, False),
        (silent, "running", 300.0, True),
        (stopped, "stopped", 600.0, False),
    ]
    first = report.workers[0]
    assert (first.host, first.pid, first.kind, first.current_run_id) == ("box", 4242, "daemon", 7)
    assert first.started_at == NOW - timedelta(hours=3)
    assert first.heartbeat_at == NOW - timedelta(seconds=5)
    assert report.workers[2].stopped_at == NOW - timedelta(minutes=10)
    patient = status(engine, NOW, stale_after_s=600)
    assert [w.stale for w in patient.workers] == [False, False, False]
    later = status(engine, NOW + timedelta(minutes=55), stale_after_s=60)
    assert [w.id for w in later.workers] == [fresh, silent]  # the stop is now over an hour ago
    assert later.workers[0].stale


def three_syncs_with_changes(
    engine: Engine, make_config: ConfigFactory, fake_api: FakeTrakt
) -> tuple[list[RunSummary], str]:
    """justin and sean synced three times, justin's settings changed before runs 2 and 3."""
    fake_api.add_account("justin")
    fake_api.add_account("sean")
    config = make_config(["justin", "sean"])
    location = fake_api.settings("justin")["profile"]["location"]
    first = sync(engine, config)
    fake_api.set_profile("justin", location="Lisbon, Portugal")
    fake_api.set_sharing_text("justin", "watched", "Finished [item] 🎬")
    fake_api.set_profile("sean", about="Someone else's change")
    second = sync(engine, config)
    fake_api.remove_network("justin", "facebook")
    third = sync(engine, config)
    return [first, second, third], location


def test_history__lists_exactly_the_accounts_change_events_in_order_decoded(
    engine: Engine, make_config: ConfigFactory, fake_api: FakeTrakt
) -> None:
    """History holds every change event of that account, oldest first, old/new decoded."""
    (first, second, third), location = three_syncs_with_changes(engine, make_config, fake_api)

    report = history(engine, "justin")

    stored = rows(
        engine,
        "SELECT e.changed_at, e.run_id, e.entity, e.entity_key, e.field, e.change, e.old_value, "
        "e.new_value FROM change_events e JOIN accounts a ON a.id = e.account_id "
        "WHERE a.username = 'justin' ORDER BY e.changed_at, e.id",
    )
    assert [
        (c.run_id, c.entity, c.key, c.field, c.change, c.old, c.new) for c in report.changes
    ] == [
        (
            e["run_id"],
            e["entity"],
            e["entity_key"],
            e["field"],
            e["change"],
            None if e["old_value"] is None else json.loads(e["old_value"]),
            None if e["new_value"] is None else json.loads(e["new_value"]),
        )
        for e in stored
    ]
    assert report.total_changes == len(report.changes) == len(stored)
    assert [c.changed_at for c in report.changes] == sorted(c.changed_at for c in report.changes)
    assert {c.run_id for c in report.changes} == {first.run_id, second.run_id, third.run_id}
    assert all(c.change == "added" and c.old is None for c in report.changes[:-3])
    later = [(c.run_id, c.entity, c.key, c.field, c.change) for c in report.changes[-3:]]
    assert sorted(later[:2], key=str) == sorted(
        [
            (second.run_id, "profile", None, "location", "changed"),
            (second.run_id, "sharing_text", "watched", "text", "changed"),
        ],
        key=str,
    )
    assert later[2] == (third.run_id, "connection", "facebook", None, "removed")
    by_field = {c.field: c for c in report.changes[-3:]}
    assert (by_field["location"].old, by_field["location"].new) == (location, "Lisbon, Portugal")
    assert by_field["text"].new == "Finished [item] 🎬"
    removed = report.changes[-1]
    assert removed.new is None
    assert isinstance(removed.old, dict)
    assert "connected" in removed.old
    assert (report.username, report.enabled) == ("justin", True)
    account = one(engine, "accounts", username="justin")
    assert (report.first_seen_at, report.last_success_at) == (
        account["first_seen_at"],
        account["last_success_at"],
    )


def test_history_with_a_limit__keeps_only_the_newest_changes(
    engine: Engine, make_config: ConfigFactory, fake_api: FakeTrakt
) -> None:
    """`limit` keeps the newest changes, still oldest first; the total still counts them all."""
    three_syncs_with_changes(engine, make_config, fake_api)
    everything = history(engine, "justin")

    newest = history(engine, "justin", limit=2)

    assert newest.changes == everything.changes[-2:]
    assert newest.total_changes == everything.total_changes
    assert history(engine, "justin", limit=0).changes == ()
    assert history(engine, "justin", limit=10_000).changes == everything.changes


def test_history_of_an_unknown_username__is_a_usage_error(
    engine: Engine, make_config: ConfigFactory, fake_api: FakeTrakt
) -> None:
    """Asking for an account that was never synced names it in a UsageError."""
    fake_api.add_account("justin")
    sync(engine, make_config(["justin"]))

    with pytest.raises(UsageError, match="no account named 'nobody'"):
        history(engine, "nobody")
    with pytest.raises(UsageError, match="0 or more"):
        history(engine, "justin", limit=-1)


def test_as_json__round_trips_with_the_expected_keys(
    engine: Engine, make_config: ConfigFactory, fake_api: FakeTrakt
) -> None:
    """Both reports become JSON objects with fixed keys and ISO-8601 UTC timestamps."""
    three_syncs_with_changes(engine, make_config, fake_api)
    fake_api.inject("sean", Fault.http(401))
    sync(engine, make_config(["justin", "sean"]))
    add_worker(engine, started_at=NOW, heartbeat_at=NOW)
    report = status(engine, NOW)

    data = json.loads(as_json(report))

    assert list(data) == [
        "generated_at",
        "runs",
        "failing",
        "workers",
        "accounts_enabled",
        "accounts_disabled",
    ]
    assert data["generated_at"] == "2026-03-01T12:00:00Z"
    assert set(data["runs"][0]) == {
        "id",
        "status",
        "trigger",
        "started_at",
        "finished_at",
        "duration_s",
        "accounts_total",
        "accounts_succeeded",
        "accounts_failed",
        "accounts_changed",
        "host",
        "pid",
        "error",
    }
    assert [r["id"] for r in data["runs"]] == [r.id for r in report.runs]
    assert datetime.fromisoformat(data["runs"][0]["started_at"]) == report.runs[0].started_at
    assert data["runs"][0]["started_at"].endswith("Z")
    assert set(data["failing"][0]) == {
        "username",
        "consecutive_failures",
        "failing_since",
        "last_error",
        "last_attempt_at",
    }
    assert data["failing"][0]["username"] == "sean"
    assert datetime.fromisoformat(data["failing"][0]["failing_since"]) == (
        report.failing[0].failing_since
    )
    assert {
        "id",
        "host",
        "pid",
        "kind",
        "state",
        "started_at",
        "heartbeat_at",
        "heartbeat_age_s",
        "stale",
        "current_run_id",
    } <= set(data["workers"][0])
    assert (data["workers"][0]["heartbeat_age_s"], data["workers"][0]["stale"]) == (0.0, False)

    timeline = json.loads(as_json(history(engine, "justin")))

    assert {"username", "enabled", "first_seen_at", "last_success_at", "changes"} <= set(timeline)
    assert set(timeline["changes"][0]) == {
        "changed_at",
        "run_id",
        "entity",
        "key",
        "field",
        "change",
        "old",
        "new",
    }
    assert timeline["changes"][-1]["change"] == "removed"
    assert timeline["changes"][-1]["new"] is None
    assert isinstance(timeline["changes"][-1]["old"], dict)
    assert "Finished [item] 🎬" in [c["new"] for c in timeline["changes"]]


def test_render__prints_runs_failing_accounts_workers_and_changes(
    engine: Engine, make_config: ConfigFactory, fake_api: FakeTrakt
) -> None:
    """The rich tables name the runs, failing usernames, workers and each change."""
    runs, _ = three_syncs_with_changes(engine, make_config, fake_api)
    fake_api.inject("sean", Fault.http(401))
    failed = sync(engine, make_config(["justin", "sean"]))
    add_worker(engine, host="cron-box-7", started_at=NOW, heartbeat_at=NOW)

    shown = printed(render_status, status(engine, NOW))

    assert "sean" in shown
    assert "cron-box-7" in shown
    for run in [*runs, failed]:
        assert str(run.run_id) in shown
    assert "partial" in shown

    timeline = printed(render_history, history(engine, "justin"))

    assert "justin" in timeline
    assert "location" in timeline
    assert "Lisbon, Portugal" in timeline
    assert "[item]" in timeline  # plain text, not swallowed as rich markup
    assert "facebook" in timeline
    assert "removed" in timeline
    limited = printed(render_history, history(engine, "justin", limit=1))
    assert "newest 1 of" in limited
