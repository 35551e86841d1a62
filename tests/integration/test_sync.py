"""End-to-end syncs over real HTTP (the bundled fake API) into real SQLite and PostgreSQL."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Engine, func, insert, inspect, select, text
from sqlalchemy.exc import IntegrityError

from etl import models
from etl.client import Fetched, TraktClient
from etl.config import AccountConfig, Config
from etl.fakeapi import DEFAULT_API_KEY, FakeTrakt, Fault, password_for, sha1_hex
from etl.logs import configure_logging
from etl.sync import RunSummary, Syncer
from tests.conftest import ConfigFactory, json_logs

pytestmark = pytest.mark.integration

HISTORY = ("profile_history", "connection_history", "sharing_text_history")
# The column that tells an account's rows of a history table apart (one profile an account).
HISTORY_KEY = {
    "profile_history": None,
    "connection_history": "network",
    "sharing_text_history": "action",
}


def sync(engine: Engine, config: Config, **kwargs: Any) -> RunSummary:
    client = TraktClient(config.api)
    try:
        return Syncer(engine, config, client).run(**kwargs)
    finally:
        client.close()


def count(engine: Engine, table: str, where: str = "1 = 1", **params: Any) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(
                text(f"SELECT COUNT(*) FROM {table} WHERE {where}"), params
            ).scalar_one()
        )


def rows(engine: Engine, sql: str, **params: Any) -> list[dict[str, Any]]:
    with engine.connect() as connection:
        return [dict(r) for r in connection.execute(text(sql), params).mappings()]


def history_counts(engine: Engine) -> dict[str, int]:
    return {table: count(engine, table) for table in (*HISTORY, "change_events")}


def versions(engine: Engine, name: str) -> list[dict[str, Any]]:
    """Every row of a history table as typed values (aware datetimes on every database), with
    its account's username as `account` and its key (network, action; None for a profile)."""
    table, key = models.metadata.tables[name], HISTORY_KEY[name]
    query = (
        select(table, models.accounts.c.username.label("account"))
        .join(models.accounts, models.accounts.c.id == table.c.account_id)
        .order_by(table.c.id)
    )
    with engine.connect() as connection:
        found = [dict(row) for row in connection.execute(query).mappings()]
    return [{**row, "key": row[key] if key else None} for row in found]


def current_ids(engine: Engine) -> dict[str, dict[tuple[str, str | None], int]]:
    """Per history table, the id of each (account, key)'s current row."""
    found: dict[str, dict[tuple[str, str | None], int]] = {}
    for name in HISTORY:
        current = [v for v in versions(engine, name) if v["valid_to"] is None]
        found[name] = {(v["account"], v["key"]): v["id"] for v in current}
    return found


@pytest.fixture
def fifty(fake_api: FakeTrakt) -> list[str]:
    return fake_api.add_generated(50)


def test_first_sync__creates_current_rows_and_added_events(
    engine: Engine, make_config: ConfigFactory, fake_api: FakeTrakt, fifty: list[str]
) -> None:
    """A first sync of 50 accounts stores each one's profile, connections and sharing texts."""
    summary = sync(engine, make_config(fifty))

    assert (summary.status, summary.counts.succeeded, summary.counts.changed) == ("success", 50, 50)
    assert count(engine, "profiles_current") == 50
    networks = sum(len(fake_api.settings(u)["connections"]) for u in fifty)
    assert count(engine, "connections_current") == networks
    assert count(engine, "sharing_texts_current") == 100
    # `change` is reserved in MariaDB; qualified, it needs no quoting anywhere.
    events = rows(engine, "SELECT e.entity, e.field, e.change, e.old_value FROM change_events e")
    assert len(events) == 50 + networks + 100
    assert {(e["change"], e["field"], e["old_value"]) for e in events} == {("added", None, None)}
    run = rows(engine, "SELECT * FROM sync_runs")[0]
    assert (run["status"], run["accounts_total"], run["accounts_succeeded"]) == ("success", 50, 50)
    assert run["finished_at"] is not None
    assert count(engine, "account_syncs", "status = 'ok'") == 50
    assert count(engine, "raw_payloads") == 50


def test_first_sync__profile_row_holds_the_payload_values(
    engine: Engine, make_config: ConfigFactory, fake_api: FakeTrakt
) -> None:
    """The seed's example account lands in profiles_current with converted names and types."""
    fake_api.add_account("justin")
    sync(engine, make_config(["justin"]))

    with engine.connect() as connection:
        profile = connection.execute(select(models.profile_history)).mappings().one()
    assert profile["full_name"] == "Justin"
    assert profile["age"] == 30
    assert profile["joined_at"] == datetime.fromtimestamp(1285436965, UTC)
    assert profile["avatar_url"] == "http://trakt.us/images/avatars/1.4.jpg"
    assert (profile["ratings_mode"], profile["vip"], profile["use_24hr"]) == (
        "advanced",
        True,
        False,
    )
    assert profile["slug"] is None  # a v2-only column
    twitter = rows(engine, "SELECT * FROM connections_current WHERE network = 'twitter'")[0]
    assert twitter["username"] == "justin"
    assert twitter["timeline_enabled"] is None  # v1 sends it for facebook only


def test_unchanged_resync__adds_no_history_row_and_no_change_event(
    engine: Engine, make_config: ConfigFactory, fifty: list[str]
) -> None:
    """Guarantee 1: syncing an unchanged payload again writes no history and no events."""
    config = make_config(fifty)
    sync(engine, config)
    before = history_counts(engine)

    with json_logs() as logs:
        summary = sync(engine, config)

    assert history_counts(engine) == before
    assert (summary.status, summary.counts.changed) == ("success", 0)
    assert count(engine, "raw_payloads") == 50  # the same bodies are not stored again
    assert not [e for e in logs if e["event"] == "account.changed"]
    assert count(engine, "account_syncs", "status = 'ok' AND changed = :f", f=False) == 50


def change_five(fake: FakeTrakt, users: list[str]) -> None:
    """A field, a connection flag, a removed network, a sharing text, and a new network."""
    fake.set_profile(users[0], location="Lisbon, Portugal")
    share_tv = fake.settings(users[1])["connections"]["twitter"]["share_tv"]
    fake.set_connection(users[1], "twitter", share_tv=not share_tv)
    fake.remove_network(users[2], "facebook")
    fake.set_sharing_text(users[3], "watched", "Finished [item] 🎬")
    fake.set_connection(users[4], "path", connected=True)


def test_third_sync_after_five_changes__replaces_exactly_those_rows(
    engine: Engine, make_config: ConfigFactory, fake_api: FakeTrakt, fifty: list[str]
) -> None:
    """Changed rows are closed at their successor's valid_from; exactly the changes are recorded."""
    config = make_config(fifty)
    sync(engine, config)
    sync(engine, config)
    old_twitter = fake_api.settings(fifty[1])["connections"]["twitter"]["share_tv"]
    change_five(fake_api, fifty)
    before = history_counts(engine)
    current_before = current_ids(engine)

    with json_logs() as logs:
        third = sync(engine, config)

    events = rows(
        engine,
        "SELECT a.username, e.entity, e.entity_key, e.field, e.change, e.old_value, e.new_value "
        "FROM change_events e JOIN accounts a ON a.id = e.account_id WHERE e.run_id = :run",
        run=third.run_id,
    )
    assert {
        (e["username"], e["entity"], e["entity_key"], e["field"], e["change"]) for e in events
    } == {
        (fifty[0], "profile", None, "location", "changed"),
        (fifty[1], "connection", "twitter", "share_tv", "changed"),
        (fifty[2], "connection", "facebook", None, "removed"),
        (fifty[3], "sharing_text", "watched", "text", "changed"),
        (fifty[4], "connection", "path", None, "added"),
    }
    by_user = {e["username"]: e for e in events}
    assert json.loads(by_user[fifty[0]]["new_value"]) == "Lisbon, Portugal"
    assert json.loads(by_user[fifty[1]]["old_value"]) is old_twitter
    assert json.loads(by_user[fifty[3]]["new_value"]) == "Finished [item] 🎬"
    assert by_user[fifty[2]]["new_value"] is None
    assert json.loads(by_user[fifty[2]]["old_value"])["connected"] is not None

    # New rows: a profile, twitter, a sharing text, "path"; the facebook row only closes.
    after = history_counts(engine)
    assert after["profile_history"] == before["profile_history"] + 1
    assert after["connection_history"] == before["connection_history"] + 2
    assert after["sharing_text_history"] == before["sharing_text_history"] + 1
    assert after["change_events"] == before["change_events"] + 5
    assert (
        count(engine, "connections_current", "username = :u AND network = 'facebook'", u=fifty[2])
        == 0
    )

    assert_replaced_exactly(
        engine,
        third.run_id,
        current_before,
        replaced={
            "profile_history": {(fifty[0], None)},
            "connection_history": {(fifty[1], "twitter")},
            "sharing_text_history": {(fifty[3], "watched")},
        },
        removed={(fifty[2], "facebook")},
        added={(fifty[4], "path")},
    )

    logged = [e for e in logs if e["event"] == "account.changed"]
    assert len(logged) == 5
    logged_changes = {
        (e["username"], c["entity"], c["key"], c["field"], c["change"])
        for e in logged
        for c in e["changes"]
    }
    assert logged_changes == {
        (e["username"], e["entity"], e["entity_key"], e["field"], e["change"]) for e in events
    }
    assert third.counts.changed == 5


def assert_replaced_exactly(
    engine: Engine,
    run_id: int,
    current_before: dict[str, dict[tuple[str, str | None], int]],
    *,
    replaced: dict[str, set[tuple[str, str | None]]],
    removed: set[tuple[str, str | None]],
    added: set[tuple[str, str | None]],
) -> None:
    """Guarantee 3 and nothing more, on every history table: the run closed exactly the rows
    that were current for the replaced and removed keys (the connection table holds the removed
    and added ones), each at the run's `as_of`; each replaced row's valid_to is its successor's
    valid_from; the run's new rows are exactly those successors and the added rows."""
    with engine.connect() as connection:
        as_of = connection.execute(
            select(models.sync_runs.c.started_at).where(models.sync_runs.c.id == run_id)
        ).scalar_one()  # a run's clock reading: every row it opens or closes carries it
    for name in HISTORY:
        gone = removed if name == "connection_history" else set()
        new = added if name == "connection_history" else set()
        rows_now = versions(engine, name)
        closed = [v for v in rows_now if v["valid_to"] is not None]
        # The first two syncs closed nothing, so every closed row is this run's doing.
        assert sorted(v["id"] for v in closed) == sorted(
            current_before[name][key] for key in replaced[name] | gone
        ), name
        opened = {(v["account"], v["key"]): v for v in rows_now if v["run_id"] == run_id}
        assert set(opened) == replaced[name] | new, name
        for old in closed:
            key = (old["account"], old["key"])
            assert old["valid_to"] == as_of, (name, key)
            if key in gone:
                assert key not in opened, (name, key)  # removed: closed with no successor
                continue
            successor = opened[key]
            assert successor["valid_to"] is None, (name, key)
            assert successor["valid_from"] == old["valid_to"], (name, key)  # contiguous
            assert successor["row_hash"] != old["row_hash"], (name, key)


def test_profile_change__valid_to_equals_successor_valid_from(
    engine: Engine, make_config: ConfigFactory, fake_api: FakeTrakt
) -> None:
    """Guarantee 3 on the profile table, read back through the ORM-free Core types."""
    fake_api.add_account("justin")
    config = make_config(["justin"])
    sync(engine, config)
    fake_api.set_profile("justin", age=31)
    sync(engine, config)

    with engine.connect() as connection:
        history = (
            connection.execute(select(models.profile_history).order_by(models.profile_history.c.id))
            .mappings()
            .all()
        )
    assert [h["age"] for h in history] == [30, 31]
    assert history[0]["valid_to"] == history[1]["valid_from"]
    assert history[0]["valid_to"].tzinfo is UTC
    assert history[1]["valid_to"] is None


CURRENT_DUPLICATES = [
    ("profile_history", {}),
    ("connection_history", {"network": "twitter"}),
    ("sharing_text_history", {"action": "watching"}),
]


@pytest.mark.parametrize(
    ("table", "key"), CURRENT_DUPLICATES, ids=[t for t, _ in CURRENT_DUPLICATES]
)
def test_database_refuses_a_second_current_row(
    engine: Engine, make_config: ConfigFactory, fake_api: FakeTrakt, table: str, key: dict[str, str]
) -> None:
    """Guarantee 2 is the database's: a hand-made second current row is refused."""
    fake_api.add_account("justin")
    sync(engine, make_config(["justin"]))
    history = models.metadata.tables[table]
    with engine.connect() as connection:
        current = (
            connection.execute(
                select(history).where(history.c.valid_to.is_(None)).limit(1).filter_by(**key)
            )
            .mappings()
            .one()
        )
    duplicate = {k: v for k, v in current.items() if k not in ("id", "is_current")}  # generated

    with pytest.raises(IntegrityError), engine.begin() as connection:
        connection.execute(insert(history).values(duplicate))

    closed = {**duplicate, "valid_to": datetime.now(UTC)}
    with engine.begin() as connection:  # a closed row with the same key is history, and fine
        connection.execute(insert(history).values(closed))


def test_failed_accounts__fail_alone_and_keep_their_history(
    engine: Engine, make_config: ConfigFactory, fake_api: FakeTrakt, fifty: list[str]
) -> None:
    """401, invalid JSON and HTML fail those accounts with a kind; the rest commit."""
    config = make_config(fifty)
    sync(engine, config)
    broken = {fifty[0]: "auth", fifty[1]: "invalid_response", fifty[2]: "invalid_response"}
    fake_api.inject(fifty[0], Fault.http(401))
    fake_api.inject(fifty[1], Fault.invalid_json())
    fake_api.inject(fifty[2], Fault.html())
    for user in fifty[:3]:  # were they fetched, these changes would be recorded
        fake_api.set_profile(user, location="Nowhere")
    fake_api.set_profile(fifty[3], location="Somewhere")
    history_before = {t: rows(engine, f"SELECT * FROM {t} ORDER BY id") for t in HISTORY}

    with json_logs() as logs:
        summary = sync(engine, config)

    assert (summary.status, summary.counts.failed, summary.counts.succeeded) == ("partial", 3, 47)
    failed = rows(
        engine,
        "SELECT a.username, s.error_kind, s.http_status, s.error_message "
        "FROM account_syncs s JOIN accounts a ON a.id = s.account_id "
        "WHERE s.run_id = :run AND s.status = 'failed'",
        run=summary.run_id,
    )
    assert {f["username"]: f["error_kind"] for f in failed} == broken
    assert {f["username"]: f["http_status"] for f in failed} == dict.fromkeys(fifty[:3], 401) | {
        fifty[1]: 200,
        fifty[2]: 200,
    }
    assert all(f["error_message"] for f in failed)
    for table in HISTORY:  # the three failures changed nothing; only fifty[3]'s profile moved
        now = rows(engine, f"SELECT * FROM {table} ORDER BY id")
        untouched = [r for r in now if r["id"] in {b["id"] for b in history_before[table]}]
        changed = [r for r in untouched if r not in history_before[table]]
        assert len(changed) == (1 if table == "profile_history" else 0)
    run = rows(
        engine, "SELECT status, accounts_failed FROM sync_runs WHERE id = :r", r=summary.run_id
    )[0]
    assert run == {"status": "partial", "accounts_failed": 3}
    account = rows(
        engine,
        "SELECT last_status, consecutive_failures, last_error FROM accounts WHERE username = :u",
        u=fifty[0],
    )[0]
    assert (account["last_status"], account["consecutive_failures"]) == ("failed", 1)
    assert "401" in account["last_error"]
    failed_logs = [e for e in logs if e["event"] == "account.failed"]
    assert {e["username"]: e["error_kind"] for e in failed_logs} == broken
    assert all({"run_id", "error", "http_status", "attempts"} <= e.keys() for e in failed_logs)


def test_api_failure_status__is_an_api_failure(
    engine: Engine, make_config: ConfigFactory, fake_api: FakeTrakt
) -> None:
    """A 200 answer saying "status": "failure" fails the account with kind api_failure."""
    fake_api.add_account("justin")
    fake_api.inject("justin", Fault.api_failure("failed authentication"))
    summary = sync(engine, make_config(["justin"]))

    assert summary.status == "failed"
    failure = rows(engine, "SELECT error_kind, error_message FROM account_syncs")[0]
    assert failure["error_kind"] == "api_failure"
    assert "failed authentication" in failure["error_message"]
    assert count(engine, "profile_history") == 0


BAD_PAYLOADS = [
    pytest.param(
        "username",
        "sean",
        'profile.username: expected "justin", got "sean"',
        id="another-users-answer",
    ),
    pytest.param("age", "thirty", 'profile.age: expected integer, got "thirty"', id="wrong-type"),
]


@pytest.mark.parametrize(("field", "value", "message"), BAD_PAYLOADS)
def test_bad_payload__fails_as_invalid_response_naming_the_field(
    engine: Engine,
    make_config: ConfigFactory,
    fake_api: FakeTrakt,
    field: str,
    value: str,
    message: str,
) -> None:
    """A wrong type, or an answer about another user, fails the account and stores nothing."""
    fake_api.add_account("justin")
    settings = fake_api.settings("justin")
    settings["profile"][field] = value
    fake_api.set_payload("justin", settings)
    sync(engine, make_config(["justin"]))

    failure = rows(engine, "SELECT error_kind, error_message FROM account_syncs")[0]
    assert (failure["error_kind"], failure["error_message"]) == ("invalid_response", message)
    assert count(engine, "profile_history") == 0
    assert count(engine, "raw_payloads") == 0


def add_unknown_fields(fake: FakeTrakt, user: str) -> None:
    """Fields the normalizer does not know: one inside a section, one at the top."""
    settings = fake.settings(user)
    settings["profile"]["pronouns"] = "they/them"
    settings["badges"] = ["early"]
    fake.set_payload(user, settings)


def drift_events(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "schema.drift"]


def test_unknown_fields__are_accepted_kept_and_reported_once(
    engine: Engine, make_config: ConfigFactory, fake_api: FakeTrakt
) -> None:
    """Guarantee 7: extra fields sync, stay in raw_payloads, and log one schema.drift per run."""
    for user in ("justin", "sean"):
        fake_api.add_account(user)
        add_unknown_fields(fake_api, user)

    with json_logs() as logs:
        summary = sync(engine, make_config(["justin", "sean"]))

    assert summary.status == "success"
    drift = drift_events(logs)
    assert len(drift) == 1
    assert drift[0]["paths"] == ["badges", "profile.pronouns"]
    assert drift[0]["run_id"] == summary.run_id
    stored = rows(engine, "SELECT body, unknown_paths FROM raw_payloads")
    assert all(json.loads(r["body"])["profile"]["pronouns"] == "they/them" for r in stored)
    assert [json.loads(r["unknown_paths"]) for r in stored] == [["badges", "profile.pronouns"]] * 2


def test_unknown_fields__are_reported_by_every_run_that_receives_them(
    engine: Engine, make_config: ConfigFactory, fake_api: FakeTrakt
) -> None:
    """An unchanged body is not decoded again, yet its unknown fields are reported again (the
    paths stored with it come with the claim); runs where no account drifts report none."""
    fake_api.add_account("justin")
    fake_api.add_account("sean")
    add_unknown_fields(fake_api, "justin")
    config = make_config(["justin", "sean"])

    reported = []
    for _ in range(2):  # the first run stores the body, the second gets it unchanged
        with json_logs() as logs:
            summary = sync(engine, config)
        assert [e["paths"] for e in drift_events(logs)] == [["badges", "profile.pronouns"]]
        assert drift_events(logs)[0]["run_id"] == summary.run_id
        reported.append(summary)
    assert count(engine, "raw_payloads") == 2  # the second run took the unchanged short-cut
    assert reported[1].counts.changed == 0

    with json_logs() as logs:
        sync(engine, config, only=["sean"])  # an account that never drifted
    assert drift_events(logs) == []

    settings = fake_api.settings("justin")
    del settings["profile"]["pronouns"], settings["badges"]
    fake_api.set_payload("justin", settings)
    for _ in range(2):  # the known fields only: a new body, then the same body unchanged
        with json_logs() as logs:
            sync(engine, config)
        assert drift_events(logs) == []
    latest = rows(engine, "SELECT unknown_paths FROM raw_payloads ORDER BY id DESC")[0]
    assert latest["unknown_paths"] is None


def test_raw_payload__stored_again_only_when_the_body_changes(
    engine: Engine, make_config: ConfigFactory, fake_api: FakeTrakt
) -> None:
    """raw_payloads gains a row per account only when the body differs from its latest."""
    fake_api.add_account("justin")
    config = make_config(["justin"])
    sync(engine, config)
    sync(engine, config)
    fake_api.set_profile("justin", about="Changed")
    third = sync(engine, config)

    payloads = rows(
        engine, "SELECT run_id, sha256, body, api_version FROM raw_payloads ORDER BY id"
    )
    assert [p["run_id"] for p in payloads] == [1, third.run_id]
    assert payloads[0]["sha256"] != payloads[1]["sha256"]
    assert json.loads(payloads[1]["body"])["profile"]["about"] == "Changed"
    assert payloads[1]["api_version"] == 1


def test_run_left_running__is_marked_aborted_by_the_next_run(
    engine: Engine, make_config: ConfigFactory, fake_api: FakeTrakt
) -> None:
    """A run a dead process left `running` is closed as `aborted` when the next run starts."""
    fake_api.add_account("justin")
    with engine.begin() as connection:
        connection.execute(
            insert(models.sync_runs).values(
                started_at=datetime(2026, 1, 1, tzinfo=UTC), status="running", trigger="schedule"
            )
        )

    sync(engine, make_config(["justin"]))

    runs = rows(engine, "SELECT id, status, finished_at FROM sync_runs ORDER BY id")
    assert [r["status"] for r in runs] == ["aborted", "success"]
    assert runs[0]["finished_at"] is not None


def test_account_removed_from_config__is_disabled_and_keeps_history(
    engine: Engine, make_config: ConfigFactory, fake_api: FakeTrakt
) -> None:
    """Dropping an account from the YAML disables it; its history stays and resumes later."""
    fake_api.add_account("justin")
    fake_api.add_account("sean")
    sync(engine, make_config(["justin", "sean"]))
    sync(engine, make_config(["justin"]))

    accounts = {r["username"]: r["enabled"] for r in rows(engine, "SELECT * FROM accounts")}
    assert accounts == {"justin": True, "sean": False}
    assert count(engine, "profiles_current", "username = 'sean'") == 1

    sync(engine, make_config(["justin", "sean"]))
    assert count(engine, "profile_history", "username = 'sean'") == 1  # resumed, not restarted
    assert {r["enabled"] for r in rows(engine, "SELECT enabled FROM accounts")} == {True}


def test_only_named_accounts__are_synced(
    engine: Engine, make_config: ConfigFactory, fake_api: FakeTrakt
) -> None:
    """`--account` limits a run to the named accounts."""
    users = fake_api.add_generated(3)
    summary = sync(engine, make_config(users), only=[users[1]])

    assert summary.counts.total == 1
    assert [r["username"] for r in rows(engine, "SELECT username FROM profiles_current")] == [
        users[1]
    ]


def test_database_rejects_a_naive_timestamp(engine: Engine) -> None:
    """UTC is enforced at the seam: a naive datetime never reaches a timestamp column."""
    with pytest.raises(Exception, match="naive datetime"), engine.begin() as connection:
        connection.execute(
            insert(models.sync_runs).values(
                started_at=datetime(2026, 1, 1), status="running", trigger="manual"
            )
        )
    with engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(models.sync_runs)).scalar() == 0


class _BuggyClient(TraktClient):
    """Stands in for a bug inside the client: it raises with every secret of the request in the
    message (the password, its SHA-1 hex, the URL with the api key in its path)."""

    def fetch(
        self, account: AccountConfig, version: int, known_sha256: str | None = None
    ) -> Fetched:
        if account.username == "justin":
            secret = account.password or ""
            url = f"{self._api.base_url}/account/settings/{self._api.api_key}"
            raise RuntimeError(
                f"unexpected state for password={secret} sha1={sha1_hex(secret)} at {url}"
            )
        return super().fetch(account, version, known_sha256)


@contextmanager
def logs_as_the_command_configures_them(config: Config) -> Iterator[list[dict[str, Any]]]:
    """`json_logs`, with the config's global secrets (the api key) given to the logging, as
    `trakt-etl` does (etl.cli): an account's own secrets are masked by the context it is
    fetched in, the global ones by the logging configuration."""
    stream = io.StringIO()
    events: list[dict[str, Any]] = []
    configure_logging(format="json", level="debug", stream=stream, secrets=config.global_secrets())
    try:
        yield events
    finally:
        events.extend(json.loads(line) for line in stream.getvalue().splitlines() if line)
        configure_logging(format="json", level="debug")


def dump_database(engine: Engine) -> str:
    """Every column of every row of every table and view, as text to search."""
    inspector = inspect(engine)
    quote = engine.dialect.identifier_preparer.quote
    names = [*inspector.get_table_names(), *inspector.get_view_names()]
    assert {"accounts", "account_syncs", "raw_payloads", "profiles_current"} <= set(names)
    lines = []
    with engine.connect() as connection:
        for name in names:
            for row in connection.execute(text(f"SELECT * FROM {quote(name)}")):
                lines.append(f"{name}: {' | '.join(map(str, row))}")
    return "\n".join(lines)


def test_bug_inside_the_client__fails_one_account_and_leaks_no_secret(
    engine: Engine, make_config: ConfigFactory, fake_api: FakeTrakt
) -> None:
    """An unexpected exception fails that account as `internal`; secrets stay out of everything:
    the captured logs and every column of every row of every table."""
    fake_api.add_account("justin")
    fake_api.add_account("sean")
    config = make_config(["justin", "sean"])
    client = _BuggyClient(config.api)

    with logs_as_the_command_configures_them(config) as logs:
        summary = Syncer(engine, config, client).run()
    client.close()

    assert (summary.counts.failed, summary.counts.succeeded) == (1, 1)
    failure = rows(
        engine, "SELECT error_kind, error_message FROM account_syncs WHERE status = 'failed'"
    )[0]
    assert failure["error_kind"] == "internal"
    assert "RuntimeError" in failure["error_message"]
    assert "password=***" in failure["error_message"]
    internal = [e for e in logs if e["event"] == "account.internal_error"]
    assert internal[0]["username"] == "justin"
    assert internal[0]["exception"][0]["exc_type"] == "RuntimeError"  # the traceback is logged
    assert "locals" not in json.dumps(internal[0]["exception"][0]["frames"])

    secrets = {DEFAULT_API_KEY} | {
        secret
        for user in ("justin", "sean")
        for secret in (password_for(user), sha1_hex(password_for(user)))
    }
    logged = json.dumps(logs, ensure_ascii=False)
    stored = dump_database(engine)
    assert count(engine, "raw_payloads") == 1  # sean's body is in the dump too
    for where, found in (("logs", logged), ("tables", stored)):
        leaked = sorted(s for s in secrets if s.lower() in found.lower())
        assert leaked == [], f"secrets found in the {where}"
