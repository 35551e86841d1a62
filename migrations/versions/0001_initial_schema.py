"""Initial schema: accounts, runs, SCD2 history tables, change events and the current views.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the types in etl.models as they were at this revision.
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TIMESTAMP = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
LONG_TEXT = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")

_FLAGS = (
    "c.connected, c.timeline_enabled, c.share_scrobbles_start, c.share_scrobbles_end, "
    "c.share_tv, c.share_movies, c.share_ratings, c.share_checkins"
)
_PROFILE = (
    "account_id, run_id, valid_from, username, full_name, gender, age, location, about, "
    "joined_at, last_login_at, avatar_url, profile_url, vip, timezone, use_24hr, protected, "
    "ratings_mode, show_badges, show_spoilers, private, vip_ep, slug, uuid, date_format, "
    "cover_image_url"
)
VIEWS = {
    "profiles_current": f"SELECT {_PROFILE} FROM profile_history WHERE valid_to IS NULL",
    "connections_current": (
        f"SELECT c.account_id, a.username, c.network, {_FLAGS}, c.valid_from, c.run_id "
        "FROM connection_history c JOIN accounts a ON a.id = c.account_id "
        "WHERE c.valid_to IS NULL"
    ),
    "sharing_texts_current": (
        "SELECT s.account_id, a.username, s.action, s.text, s.valid_from, s.run_id "
        "FROM sharing_text_history s JOIN accounts a ON a.id = s.account_id "
        "WHERE s.valid_to IS NULL"
    ),
}


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("username", sa.String(length=255), nullable=False),
        sa.Column("api_version", sa.Integer(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("first_seen_at", TIMESTAMP, nullable=False),
        sa.Column("last_attempt_at", TIMESTAMP, nullable=True),
        sa.Column("last_success_at", TIMESTAMP, nullable=True),
        sa.Column("last_status", sa.String(length=16), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("consecutive_failures", sa.Integer(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_accounts")),
        sa.UniqueConstraint("username", name=op.f("uq_accounts_username")),
    )
    op.create_table(
        "sync_runs",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("started_at", TIMESTAMP, nullable=False),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("trigger", sa.String(length=16), nullable=False),
        sa.Column("accounts_total", sa.Integer(), server_default="0", nullable=False),
        sa.Column("accounts_succeeded", sa.Integer(), server_default="0", nullable=False),
        sa.Column("accounts_failed", sa.Integer(), server_default="0", nullable=False),
        sa.Column("accounts_changed", sa.Integer(), server_default="0", nullable=False),
        sa.Column("host", sa.String(length=255), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sync_runs")),
    )
    op.create_index("ix_sync_runs_status", "sync_runs", ["status"], unique=False)
    op.create_table(
        "account_syncs",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("run_id", ID, nullable=False),
        sa.Column("account_id", ID, nullable=False),
        sa.Column("started_at", TIMESTAMP, nullable=False),
        sa.Column("finished_at", TIMESTAMP, nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("changed", sa.Boolean(), nullable=False),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("error_kind", sa.String(length=32), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_account_syncs_account_id_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["sync_runs.id"], name=op.f("fk_account_syncs_run_id_sync_runs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_account_syncs")),
    )
    op.create_index(
        "ix_account_syncs_account_id_run_id",
        "account_syncs",
        ["account_id", "run_id"],
        unique=False,
    )
    op.create_index("ix_account_syncs_run_id", "account_syncs", ["run_id"], unique=False)
    op.create_table(
        "change_events",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("run_id", ID, nullable=False),
        sa.Column("account_id", ID, nullable=False),
        sa.Column("changed_at", TIMESTAMP, nullable=False),
        sa.Column("entity", sa.String(length=16), nullable=False),
        sa.Column("entity_key", sa.String(length=64), nullable=True),
        sa.Column("field", sa.String(length=64), nullable=True),
        sa.Column("change", sa.String(length=16), nullable=False),
        sa.Column("old_value", sa.Text(), nullable=True),
        sa.Column("new_value", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_change_events_account_id_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["sync_runs.id"], name=op.f("fk_change_events_run_id_sync_runs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_change_events")),
    )
    op.create_index(
        "ix_change_events_account_id_changed_at",
        "change_events",
        ["account_id", "changed_at"],
        unique=False,
    )
    op.create_index("ix_change_events_run_id", "change_events", ["run_id"], unique=False)
    op.create_table(
        "connection_history",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("account_id", ID, nullable=False),
        sa.Column("run_id", ID, nullable=False),
        sa.Column("network", sa.String(length=64), nullable=False),
        sa.Column("valid_from", TIMESTAMP, nullable=False),
        sa.Column("valid_to", TIMESTAMP, nullable=True),
        sa.Column("row_hash", sa.String(length=64), nullable=False),
        sa.Column("connected", sa.Boolean(), nullable=True),
        sa.Column("timeline_enabled", sa.Boolean(), nullable=True),
        sa.Column("share_scrobbles_start", sa.Boolean(), nullable=True),
        sa.Column("share_scrobbles_end", sa.Boolean(), nullable=True),
        sa.Column("share_tv", sa.Boolean(), nullable=True),
        sa.Column("share_movies", sa.Boolean(), nullable=True),
        sa.Column("share_ratings", sa.Boolean(), nullable=True),
        sa.Column("share_checkins", sa.Boolean(), nullable=True),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_connection_history_account_id_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["sync_runs.id"], name=op.f("fk_connection_history_run_id_sync_runs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_connection_history")),
    )
    op.create_index(
        "ix_connection_history_account_id_valid_from",
        "connection_history",
        ["account_id", "valid_from"],
        unique=False,
    )
    op.create_index(
        "uq_connection_history_current",
        "connection_history",
        ["account_id", "network"],
        unique=True,
        sqlite_where=sa.text("valid_to IS NULL"),
        postgresql_where=sa.text("valid_to IS NULL"),
    )
    op.create_table(
        "profile_history",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("account_id", ID, nullable=False),
        sa.Column("run_id", ID, nullable=False),
        sa.Column("valid_from", TIMESTAMP, nullable=False),
        sa.Column("valid_to", TIMESTAMP, nullable=True),
        sa.Column("row_hash", sa.String(length=64), nullable=False),
        sa.Column("username", sa.String(length=255), nullable=True),
        sa.Column("full_name", sa.Text(), nullable=True),
        sa.Column("gender", sa.String(length=32), nullable=True),
        sa.Column("age", sa.Integer(), nullable=True),
        sa.Column("location", sa.Text(), nullable=True),
        sa.Column("about", sa.Text(), nullable=True),
        sa.Column("joined_at", TIMESTAMP, nullable=True),
        sa.Column("last_login_at", TIMESTAMP, nullable=True),
        sa.Column("avatar_url", sa.Text(), nullable=True),
        sa.Column("profile_url", sa.Text(), nullable=True),
        sa.Column("vip", sa.Boolean(), nullable=True),
        sa.Column("timezone", sa.String(length=64), nullable=True),
        sa.Column("use_24hr", sa.Boolean(), nullable=True),
        sa.Column("protected", sa.Boolean(), nullable=True),
        sa.Column("ratings_mode", sa.String(length=32), nullable=True),
        sa.Column("show_badges", sa.Boolean(), nullable=True),
        sa.Column("show_spoilers", sa.Boolean(), nullable=True),
        sa.Column("private", sa.Boolean(), nullable=True),
        sa.Column("vip_ep", sa.Boolean(), nullable=True),
        sa.Column("slug", sa.String(length=255), nullable=True),
        sa.Column("uuid", sa.String(length=64), nullable=True),
        sa.Column("date_format", sa.String(length=32), nullable=True),
        sa.Column("cover_image_url", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_profile_history_account_id_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["sync_runs.id"], name=op.f("fk_profile_history_run_id_sync_runs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_profile_history")),
    )
    op.create_index(
        "ix_profile_history_account_id_valid_from",
        "profile_history",
        ["account_id", "valid_from"],
        unique=False,
    )
    op.create_index(
        "uq_profile_history_current",
        "profile_history",
        ["account_id"],
        unique=True,
        sqlite_where=sa.text("valid_to IS NULL"),
        postgresql_where=sa.text("valid_to IS NULL"),
    )
    op.create_table(
        "raw_payloads",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("account_id", ID, nullable=False),
        sa.Column("run_id", ID, nullable=False),
        sa.Column("fetched_at", TIMESTAMP, nullable=False),
        sa.Column("api_version", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("body", LONG_TEXT, nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_raw_payloads_account_id_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["sync_runs.id"], name=op.f("fk_raw_payloads_run_id_sync_runs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_raw_payloads")),
    )
    op.create_index(
        "ix_raw_payloads_account_id_id", "raw_payloads", ["account_id", "id"], unique=False
    )
    op.create_table(
        "sharing_text_history",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("account_id", ID, nullable=False),
        sa.Column("run_id", ID, nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("text", sa.Text(), nullable=True),
        sa.Column("valid_from", TIMESTAMP, nullable=False),
        sa.Column("valid_to", TIMESTAMP, nullable=True),
        sa.Column("row_hash", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_sharing_text_history_account_id_accounts"),
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["sync_runs.id"], name=op.f("fk_sharing_text_history_run_id_sync_runs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sharing_text_history")),
    )
    op.create_index(
        "ix_sharing_text_history_account_id_valid_from",
        "sharing_text_history",
        ["account_id", "valid_from"],
        unique=False,
    )
    op.create_index(
        "uq_sharing_text_history_current",
        "sharing_text_history",
        ["account_id", "action"],
        unique=True,
        sqlite_where=sa.text("valid_to IS NULL"),
        postgresql_where=sa.text("valid_to IS NULL"),
    )

    for name, select in VIEWS.items():
        op.execute(f"CREATE VIEW {name} AS {select}")


def downgrade() -> None:
    for name in VIEWS:
        op.execute(f"DROP VIEW {name}")
    # Dropping a table drops its indexes; dropping them first fails on MariaDB, where an index
    # that backs a foreign key cannot go while the key stays.
    op.drop_table("sharing_text_history")
    op.drop_table("raw_payloads")
    op.drop_table("profile_history")
    op.drop_table("connection_history")
    op.drop_table("change_events")
    op.drop_table("account_syncs")
    op.drop_table("sync_runs")
    op.drop_table("accounts")
