"""A hostile API in one run: one account per fault, plus 50 normal ones, over real HTTP.

Every account must end as expected: transient faults succeed after retries, the others fail with
the right error kind, failed accounts keep their history, and the fake API's request counts show
no retry of a final error and never more attempts than configured.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine, text

from etl.client import TraktClient
from etl.config import Config
from etl.fakeapi import FakeTrakt, Fault
from etl.sync import Syncer
from tests.conftest import ConfigFactory, json_logs

pytestmark = pytest.mark.integration

RETRIES = 2
ODD_TEXT = "🎬 مرحبا بالعالم — O'Brien\"; DROP TABLE accounts; -- ✓"
NUL_TEXT = "before\x00after"


Spoil = Callable[[FakeTrakt, str], None]


def inject(fault: Fault) -> Spoil:
    return lambda fake, name: fake.inject(name, fault)


def edit(change: Callable[[dict[str, Any]], None]) -> Spoil:
    """Serve the account's own settings, changed."""

    def spoil(fake: FakeTrakt, name: str) -> None:
        settings = fake.settings(name)
        change(settings)
        fake.set_payload(name, settings)

    return spoil


def wrong_types(settings: dict[str, Any]) -> None:
    settings["profile"]["age"] = "thirty"
    settings["account"]["use_24hr"] = "yes"


def nulls_everywhere(settings: dict[str, Any]) -> None:
    """Every leaf null but the username (an answer about nobody is another fault)."""

    def blank(node: dict[str, Any]) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                blank(value)
            elif key != "username":
                node[key] = None

    blank(settings)


def missing_sections(settings: dict[str, Any]) -> None:
    del settings["account"], settings["connections"]


def unknown_fields(settings: dict[str, Any]) -> None:
    settings["profile"]["pronouns"] = "they/them"
    settings["connections"]["facebook"]["share_reels"] = True


def odd_text(fake: FakeTrakt, name: str) -> None:
    fake.set_profile(name, about=ODD_TEXT, location="القاهرة")
    fake.set_sharing_text(name, "watching", ODD_TEXT)


def nul_text(fake: FakeTrakt, name: str) -> None:
    fake.set_profile(name, about=NUL_TEXT)


ATTEMPTS = RETRIES + 1
MiB = 1024 * 1024
# username, how the fake misbehaves, the error kind (None: synced), requests the fake must see
CASES: list[tuple[str, Spoil, str | None, int]] = [
    ("slow", inject(Fault.delay(2.0)), "timeout", ATTEMPTS),
    ("dripping", inject(Fault.drip(4, 0.2)), "timeout", ATTEMPTS),  # each read quick, not all
    ("reset", inject(Fault.reset()), "connection", ATTEMPTS),
    ("http500", inject(Fault.http(500)), "http", ATTEMPTS),
    ("flaky503", inject(Fault.http(503, times=1)), None, 2),
    ("limited429", inject(Fault.http(429, times=1, headers={"Retry-After": "1"})), None, 2),
    ("every_other502", inject(Fault.alternating(502)), None, 2),
    ("badjson", inject(Fault.invalid_json()), "invalid_response", 1),
    ("htmlpage", inject(Fault.html()), "invalid_response", 1),
    ("mislabeled", inject(Fault.mislabeled("text/plain")), "invalid_response", 1),
    ("emptybody", inject(Fault.empty()), "invalid_response", 1),
    ("apifailure", inject(Fault.api_failure()), "api_failure", 1),
    ("unauthorized", inject(Fault.http(401)), "auth", 1),
    ("huge", inject(Fault.huge(20 * MiB, chunked=True)), "too_large", 1),
    ("hugelength", inject(Fault.huge(20 * MiB, chunked=False)), "too_large", 1),
    ("redirected", inject(Fault.redirect("http://127.0.0.1:9/unreachable")), "http", 1),
    ("wrongtypes", edit(wrong_types), "invalid_response", 1),
    ("nulls", edit(nulls_everywhere), None, 1),
    ("missing", edit(missing_sections), "invalid_response", 1),
    ("extra", edit(unknown_fields), None, 1),
    ("oddtext", odd_text, None, 1),
    ("nultext", nul_text, "storage on postgresql", 1),
]


def sync(engine: Engine, config: Config) -> int:
    client = TraktClient(config.api)
    try:
        return Syncer(engine, config, client).run().run_id
    finally:
        client.close()


def history(engine: Engine, username: str) -> list[tuple[Any, ...]]:
    with engine.connect() as connection:
        return [
            tuple(row)
            for table in ("profile_history", "connection_history", "sharing_text_history")
            for row in connection.execute(
                text(
                    f"SELECT h.* FROM {table} h JOIN accounts a ON a.id = h.account_id "
                    "WHERE a.username = :u ORDER BY h.id"
                ),
                {"u": username},
            )
        ]


def expected_kind(kind: str | None, dialect: str) -> str | None:
    if kind == "storage on postgresql":  # PostgreSQL text cannot hold NUL; SQLite's can
        return "storage" if dialect == "postgresql" else None
    return kind


def test_fault_matrix__each_account_ends_as_expected(
    engine: Engine, make_config: ConfigFactory, fake_api: FakeTrakt
) -> None:
    """Transient faults recover, final ones fail alone with their kind, and nothing is lost."""
    dialect = engine.dialect.name
    normal = fake_api.add_generated(50)
    for name, *_ in CASES:
        fake_api.add_account(name)
    config = make_config(
        [*normal, *(name for name, *_ in CASES)],
        retries=RETRIES,
        timeout_s=0.5,
        concurrency=8,
        retry_after_max_s=2,
    )
    sync(engine, config)  # a clean first run: every account has history to keep
    before = {name: history(engine, name) for name, *_ in CASES}
    assert all(before.values())
    for name, spoil, *_ in CASES:
        spoil(fake_api, name)
    fake_api.reset_counts()

    started = time.monotonic()
    with json_logs() as logs:
        run_id = sync(engine, config)
    elapsed = time.monotonic() - started

    with engine.connect() as connection:
        outcome = {
            row.username: row
            for row in connection.execute(
                text(
                    "SELECT a.username, s.status, s.error_kind, s.attempts, s.error_message "
                    "FROM account_syncs s JOIN accounts a ON a.id = s.account_id "
                    "WHERE s.run_id = :run"
                ),
                {"run": run_id},
            )
        }
    assert len(outcome) == 50 + len(CASES)
    assert all(outcome[name].status == "ok" for name in normal)
    for name, _, kind, requests in CASES:
        row, seen = outcome[name], fake_api.request_count(name)
        assert (name, row.error_kind) == (name, expected_kind(kind, dialect)), row.error_message
        assert (name, seen) == (name, requests)
        assert row.attempts == seen <= ATTEMPTS
        if row.error_kind is not None:
            assert history(engine, name) == before[name], f"{name}: failure changed history"
            assert row.error_message
    assert elapsed < 30  # the 20 MB bodies were cut short, the slow and dripping ones timed out

    drift = [e for e in logs if e["event"] == "schema.drift"]
    assert len(drift) == 1
    assert drift[0]["paths"] == ["connections.facebook.share_reels", "profile.pronouns"]

    with engine.connect() as connection:
        odd = connection.execute(
            text(
                "SELECT p.about, p.location, s.text FROM profiles_current p "
                "JOIN sharing_texts_current s ON s.account_id = p.account_id "
                "WHERE p.username = 'oddtext' AND s.action = 'watching'"
            )
        ).one()
        nulls = connection.execute(
            text(
                "SELECT full_name, age, vip, ratings_mode, timezone FROM profiles_current "
                "WHERE username = 'nulls'"
            )
        ).one()
        nul_about = connection.execute(
            text("SELECT about FROM profiles_current WHERE username = 'nultext'")
        ).scalar_one()
    assert tuple(odd) == (ODD_TEXT, "القاهرة", ODD_TEXT)
    assert tuple(nulls) == (None, None, None, None, None)
    if dialect == "postgresql":
        assert nul_about != NUL_TEXT  # refused whole: the earlier row is still current
    else:
        assert nul_about == NUL_TEXT
