"""Claiming accounts (etl.claims) against real databases: keyset order, leases, query plans."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy import Engine, insert, select, text, update
from sqlalchemy.dialects import sqlite

from etl import claims
from etl.client import TraktClient
from etl.fakeapi import FakeTrakt
from etl.models import accounts, raw_payloads, sync_runs
from etl.sync import Syncer
from tests.conftest import ConfigFactory

pytestmark = pytest.mark.integration

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def add_accounts(engine: Engine, count: int) -> list[int]:
    with engine.begin() as connection:
        connection.execute(
            insert(accounts),
            [
                {"username": f"user{n:05d}", "api_version": 1, "enabled": True}
                | {"first_seen_at": NOW}
                for n in range(1, count + 1)
            ],
        )
        return list(connection.execute(select(accounts.c.id).order_by(accounts.c.id)).scalars())


def test_claim__walks_ids_after_the_cursor_leasing_them_with_their_latest_hash(
    engine: Engine,
) -> None:
    """A claim takes the next free accounts after `after_id`, in id order, leased to the
    worker, each with the hash and the unknown paths of its latest raw payload."""
    ids = add_accounts(engine, 10)
    with engine.begin() as connection:
        run = connection.execute(
            insert(sync_runs).values(started_at=NOW, status="success", trigger="manual")
        ).inserted_primary_key[0]
        for number, sha, paths in (
            (1, "a" * 64, '["badges"]'),  # replaced by a body without unknown fields
            (1, "b" * 64, None),
            (3, "c" * 64, '["badges", "profile.pronouns"]'),
        ):
            connection.execute(
                insert(raw_payloads).values(
                    account_id=ids[number], run_id=run, fetched_at=NOW, api_version=1,
                    sha256=sha, body="{}", unknown_paths=paths,
                )
            )  # fmt: skip
        first = claims.claim(connection, worker_id=7, now=NOW, lease_s=60, limit=4, after_id=0)
        second = claims.claim(
            connection, worker_id=7, now=NOW, lease_s=60, limit=4, after_id=first[-1].account_id
        )

    assert [c.account_id for c in first] == ids[:4]
    assert [c.account_id for c in second] == ids[4:8]
    assert [c.payload_sha256 for c in first] == [None, "b" * 64, None, "c" * 64]
    assert [c.unknown_paths for c in first] == [(), (), (), ("badges", "profile.pronouns")]
    with engine.connect() as connection:
        leased = connection.execute(
            select(accounts.c.id).where(accounts.c.lease_owner == 7).order_by(accounts.c.id)
        ).scalars()
        assert list(leased) == ids[:8]


def test_claim__skips_accounts_another_worker_holds(engine: Engine) -> None:
    """Accounts leased to someone else until later are not taken; expired leases are."""
    ids = add_accounts(engine, 6)
    with engine.begin() as connection:
        connection.execute(
            update(accounts)
            .where(accounts.c.id.in_(ids[:2]))
            .values(lease_owner=99, lease_expires_at=NOW + timedelta(minutes=1))
        )
        connection.execute(
            update(accounts)
            .where(accounts.c.id == ids[2])
            .values(lease_owner=99, lease_expires_at=NOW - timedelta(seconds=1))
        )
        found = claims.claim(connection, worker_id=7, now=NOW, lease_s=60, limit=10)

    assert [c.account_id for c in found] == ids[2:]


@pytest.mark.parametrize("scheduled", [False, True], ids=["manual", "scheduled"])
def test_claim_query__uses_the_enabled_id_index_without_sorting(
    sqlite_engine: Engine, scheduled: bool
) -> None:
    """On SQLite the claim reads accounts in index order from the cursor: no table scan and no
    sort per claim, which made a run quadratic in the number of accounts. (PostgreSQL walks
    its primary key; benchmarks/bench_sync.py checks that a run stays linear there.)"""
    conditions = [accounts.c.enabled.is_(True), claims._free(NOW), accounts.c.id > 10]
    if scheduled:
        conditions.append(claims._due(NOW))
    else:
        conditions.append(
            sa.or_(accounts.c.last_attempt_at.is_(None), accounts.c.last_attempt_at < NOW)
        )
    query = (
        select(accounts.c.id, *claims._latest_payload_columns())
        .where(*conditions)
        .order_by(accounts.c.id)
        .limit(50)
    )
    compiled = query.compile(dialect=sqlite.dialect(), compile_kwargs={"literal_binds": True})
    with sqlite_engine.connect() as connection:
        plan = [row[3] for row in connection.execute(text(f"EXPLAIN QUERY PLAN {compiled}"))]

    assert any("USING INDEX ix_accounts_enabled_id" in step for step in plan), plan
    assert not any("TEMP B-TREE" in step or step.startswith("SCAN") for step in plan), plan


def test_run__takes_accounts_freed_behind_its_cursor_in_a_last_sweep(
    sqlite_engine: Engine, sqlite_config: ConfigFactory, fake_api: FakeTrakt
) -> None:
    """Accounts another worker held when the run passed them, and freed since, are synced by
    the run's final sweep from the start, not left for the next run."""
    users = fake_api.add_generated(30)
    fake_api.latency_s = 0.05  # 30 accounts, 2 at a time: ~0.75 s
    config = sqlite_config(users, concurrency=2, fetch_processes=0)
    client = TraktClient(config.api)
    Syncer(sqlite_engine, config, client).run()  # registers the accounts
    fake_api.set_profile(users[0], location="changed meanwhile")
    soon = datetime.now(UTC) + timedelta(seconds=0.3)
    with sqlite_engine.begin() as connection:
        connection.execute(
            update(accounts)
            .where(accounts.c.username.in_(users[:5]))
            .values(lease_owner=99, lease_expires_at=soon)
        )

    summary = Syncer(sqlite_engine, config, client).run()
    client.close()

    assert (summary.status, summary.counts.succeeded) == ("success", 30)
    with sqlite_engine.connect() as connection:
        location = connection.execute(
            text("SELECT location FROM profiles_current WHERE username = :u"), {"u": users[0]}
        ).scalar_one()
    assert location == "changed meanwhile"
