"""The Alembic migrations as code: linear history, round trips, agreement with etl.models and
the contract's names, and data carried across an upgrade, on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, MetaData, insert, inspect, select, text
from sqlalchemy.exc import IntegrityError

from etl import db, models

pytestmark = pytest.mark.integration

CONTRACT_CHECK = Path(__file__).resolve().parents[3] / "shared" / "tools" / "contract_check.py"
BEFORE_IS_CURRENT = "0002"  # the revision before history rows got `is_current`
BEFORE_UNKNOWN_PATHS = "0004"  # the revision before raw_payloads got `unknown_paths`

T0 = datetime(2026, 1, 1, 8, 0, tzinfo=UTC)
T1 = datetime(2026, 2, 1, 9, 30, 15, 123456, tzinfo=UTC)
T2 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)


def script_directory() -> ScriptDirectory:
    """The migration scripts trakt-etl itself runs (the script location etl.db uses)."""
    return ScriptDirectory.from_config(db._alembic_config())


def revisions_in_order() -> list[str]:
    """Revision ids from base to head."""
    return [rev.revision for rev in reversed(list(script_directory().walk_revisions()))]


@pytest.fixture
def bare_engine(database_url: str) -> Iterator[Engine]:
    """An engine on an empty, unmigrated database."""
    engine = db.make_engine(database_url)
    yield engine
    engine.dispose()


def contract_names() -> ModuleType:
    if not CONTRACT_CHECK.is_file():
        pytest.skip(f"{CONTRACT_CHECK} is not there: no contract names to check against")
    spec = importlib.util.spec_from_file_location("contract_check", CONTRACT_CHECK)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_history_is_linear_with_one_head() -> None:
    """The migration history is one straight line: a single head, no branches or merges."""
    scripts = script_directory()
    assert len(scripts.get_heads()) == 1
    assert scripts.get_heads() == list(db.heads())
    assert len(scripts.get_bases()) == 1
    for rev in scripts.walk_revisions():
        assert rev.down_revision is None or isinstance(rev.down_revision, str), rev.revision
        assert not rev.is_merge_point, f"{rev.revision} merges branches"
        assert not rev.is_branch_point, f"{rev.revision} has more than one child"
        assert not rev.branch_labels, f"{rev.revision} has branch labels"
        assert not rev.dependencies, f"{rev.revision} depends on another branch"
    assert len(revisions_in_order()) == len(list(scripts.walk_revisions()))


def test_upgrade_downgrade_upgrade_round_trip(bare_engine: Engine) -> None:
    """Empty → head → base leaves no tables (but alembic_version) or views → head again."""
    (head,) = db.heads()
    assert db.current_revision(bare_engine) is None
    db.upgrade(bare_engine)
    assert db.current_revision(bare_engine) == head

    db.downgrade(bare_engine, "base")
    inspector = inspect(bare_engine)
    assert set(inspector.get_table_names()) <= {"alembic_version"}
    assert inspector.get_view_names() == []
    assert db.current_revision(bare_engine) is None

    db.upgrade(bare_engine)
    assert db.current_revision(bare_engine) == head


def test_head_revision_constant_is_the_scripts_head() -> None:
    """The revision a sync checks for without loading Alembic is the migrations' one head."""
    assert db.heads() == (db.HEAD_REVISION,)


def test_workers_upgrading_one_new_database_at_once_all_succeed(bare_engine: Engine) -> None:
    """Three processes' worth of upgrades at once: one creates the schema, none fails."""
    failures: list[BaseException] = []

    def upgrade() -> None:
        try:
            db.upgrade(bare_engine)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=upgrade) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert failures == []
    assert db.current_revision(bare_engine) == db.HEAD_REVISION


def test_each_revision_upgrades_and_downgrades_one_step_at_a_time(bare_engine: Engine) -> None:
    """Every revision applies on its own from base to head, and undoes on its own back down."""
    order = revisions_in_order()
    for revision in order:
        db.upgrade(bare_engine, "+1")
        assert db.current_revision(bare_engine) == revision
    for below in [*reversed(order[:-1]), None]:
        db.downgrade(bare_engine, "-1")
        assert db.current_revision(bare_engine) == below


def test_models_match_migrated_schema(bare_engine: Engine) -> None:
    """After upgrading to head, autogenerate finds no difference from etl.models.metadata."""
    db.upgrade(bare_engine)
    with bare_engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        diff = compare_metadata(context, models.metadata)
    assert diff == []


def test_migrated_schema_has_contract_tables_views_and_columns(bare_engine: Engine) -> None:
    """Every table, view and column that contract_check.py checks exists at head."""
    contract = contract_names()
    db.upgrade(bare_engine)
    inspector = inspect(bare_engine)
    tables, views = set(inspector.get_table_names()), set(inspector.get_view_names())
    missing = []
    for kind, wanted, present in (
        ("table", contract.TABLES, tables),
        ("view", contract.VIEWS, views),
    ):
        for name, columns in wanted.items():
            if name not in present:
                missing.append(f"{kind} {name}")
                continue
            have = {column["name"] for column in inspector.get_columns(name)}
            missing += [f"{name}.{column}" for column in columns if column not in have]
    assert missing == []


def test_history_rows_survive_upgrade_and_current_row_stays_unique(bare_engine: Engine) -> None:
    """Rows written at 0002 survive the upgrade to head and get is_current; the database then
    refuses a second current profile row for the account and accepts another closed one."""
    db.upgrade(bare_engine, BEFORE_IS_CURRENT)
    old = MetaData()
    old.reflect(bare_engine, only=["accounts", "sync_runs", "profile_history"])
    dialect = bare_engine.dialect.name

    def stored(row: dict[str, Any]) -> dict[str, Any]:
        # Reflected timestamp columns take UTC as stored: aware only on PostgreSQL.
        return {
            key: value.replace(tzinfo=None)
            if isinstance(value, datetime) and dialect != "postgresql"
            else value
            for key, value in row.items()
        }

    accounts = {
        name: {
            "username": name,
            "api_version": 1,
            "enabled": True,
            "first_seen_at": T0,
            "last_status": "ok",
            "consecutive_failures": 0,
        }
        for name in ("justin", "sean")
    }
    run = {
        "started_at": T0,
        "finished_at": T2,
        "status": "success",
        "trigger": "manual",
        "accounts_total": 2,
        "accounts_succeeded": 2,
        "heartbeat_at": T2,
    }
    profile = {"age": 41, "timezone": "Europe/Berlin", "about": "héllo ✓"}
    closed = {**profile, "valid_from": T0, "valid_to": T1, "row_hash": "a" * 64, "vip": False}
    current = {**profile, "valid_from": T1, "valid_to": None, "row_hash": "b" * 64, "vip": True}
    # Before 0003, MariaDB's "partial" index was a plain UNIQUE(account_id): a database there
    # can hold one profile row per account, so its closed row belongs to another account.
    closed_owner = "sean" if dialect in ("mysql", "mariadb") else "justin"

    with bare_engine.begin() as connection:
        ids = {
            name: connection.execute(
                insert(old.tables["accounts"]).values(stored(row))
            ).inserted_primary_key[0]
            for name, row in accounts.items()
        }
        run_id = connection.execute(
            insert(old.tables["sync_runs"]).values(stored(run))
        ).inserted_primary_key[0]
        closed_id, current_id = (
            connection.execute(
                insert(old.tables["profile_history"]).values(
                    {**stored(row), "account_id": ids[owner], "run_id": run_id, "username": owner}
                )
            ).inserted_primary_key[0]
            for row, owner in ((closed, closed_owner), (current, "justin"))
        )

    db.upgrade(bare_engine)
    assert db.current_revision(bare_engine) == db.heads()[0]

    history = models.profile_history
    with bare_engine.connect() as connection:
        got_accounts = {
            row.username: row._asdict() for row in connection.execute(select(models.accounts))
        }
        got_runs = [row._asdict() for row in connection.execute(select(models.sync_runs))]
        rows = {row.id: row._asdict() for row in connection.execute(select(history))}
    assert {name: {k: got_accounts[name][k] for k in accounts[name]} for name in ids} == accounts
    assert {name: got_accounts[name]["id"] for name in ids} == ids
    assert [{k: got[k] for k in run} for got in got_runs] == [run]
    assert set(rows) == {closed_id, current_id}
    assert {k: rows[closed_id][k] for k in closed} == closed
    assert {k: rows[current_id][k] for k in current} == current
    assert (rows[closed_id]["account_id"], rows[closed_id]["username"]) == (
        ids[closed_owner],
        closed_owner,
    )
    assert (rows[current_id]["account_id"], rows[current_id]["run_id"]) == (ids["justin"], run_id)
    assert rows[current_id]["is_current"] == 1
    assert rows[closed_id]["is_current"] is None

    keys = {"account_id": ids["justin"], "run_id": run_id, "username": "justin"}
    with pytest.raises(IntegrityError), bare_engine.begin() as connection:
        connection.execute(insert(history).values({**current, **keys, "valid_from": T2}))
    for valid_from, valid_to in ((T0, T1), (T0, T2)):
        with bare_engine.begin() as connection:
            connection.execute(
                insert(history).values(
                    {**closed, **keys, "valid_from": valid_from, "valid_to": valid_to}
                )
            )
    with bare_engine.connect() as connection:
        justin = connection.execute(
            select(history.c.id, history.c.is_current).where(history.c.account_id == ids["justin"])
        ).all()
    assert len(justin) == (4 if closed_owner == "justin" else 3)
    assert [row.id for row in justin if row.is_current == 1] == [current_id]


def test_raw_payloads_keep_their_rows_across_unknown_paths_up_and_down(
    bare_engine: Engine,
) -> None:
    """0005 adds raw_payloads.unknown_paths: a body stored before it reads back with NULL (no
    paths known), and undoing 0005 (a table rebuild on SQLite) keeps every row."""
    db.upgrade(bare_engine, BEFORE_UNKNOWN_PATHS)
    # At 0004 the tables are etl.models' but for the new column, which these inserts leave out.
    account = {"username": "justin", "api_version": 1, "enabled": True, "first_seen_at": T0}
    run = {"started_at": T0, "status": "success", "trigger": "manual"}
    with bare_engine.begin() as connection:
        account_id = connection.execute(
            insert(models.accounts).values(account)
        ).inserted_primary_key[0]
        run_id = connection.execute(insert(models.sync_runs).values(run)).inserted_primary_key[0]
        payload = {"account_id": account_id, "run_id": run_id, "fetched_at": T1}
        payload |= {"api_version": 1, "sha256": "a" * 64, "body": '{"badges": ["é"]}'}
        connection.execute(insert(models.raw_payloads).values(payload))

    db.upgrade(bare_engine)
    with bare_engine.begin() as connection:
        (before,) = connection.execute(select(models.raw_payloads)).mappings().all()
        connection.execute(
            insert(models.raw_payloads).values(
                {**payload, "sha256": "b" * 64, "unknown_paths": '["badges"]'}
            )
        )
    assert before["unknown_paths"] is None
    assert (before["sha256"], before["body"]) == (payload["sha256"], payload["body"])

    db.downgrade(bare_engine, BEFORE_UNKNOWN_PATHS)
    with bare_engine.connect() as connection:
        kept = connection.execute(text("SELECT sha256, body FROM raw_payloads ORDER BY id")).all()
    assert [tuple(row) for row in kept] == [
        ("a" * 64, payload["body"]),
        ("b" * 64, payload["body"]),
    ]
    assert "unknown_paths" not in {
        c["name"] for c in inspect(bare_engine).get_columns("raw_payloads")
    }
