"""The SQL schema as SQLAlchemy Core tables: the single source the migrations are checked against.

Core, not ORM: the writer works in batches of plain rows, and Core keeps that cheap and explicit.
The `*_current` views exist only in the migration (SQLAlchemy has no view construct); the
migration tests check that they expose the contract's columns.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Computed,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.dialects import mysql

from etl.records import CONNECTION_FLAGS

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
metadata = MetaData(naming_convention=NAMING)


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps are UTC everywhere: aware datetimes in, aware UTC datetimes out.

    SQLite and MariaDB have no time zone type, so UTC is stored naive there and re-attached on
    read; PostgreSQL stores `timestamptz`. MariaDB keeps microseconds with DATETIME(6).
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value if dialect.name == "postgresql" else value.replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# SQLite only auto-increments an INTEGER PRIMARY KEY; elsewhere ids are 64-bit.
Id = BigInteger().with_variant(Integer(), "sqlite")
# MariaDB's TEXT stops at 64 KiB; raw bodies may reach the configured size limit (1 MiB default).
LongText = Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
# Free text of up to 65,536 characters (the normalizer's cap) is up to 256 KiB in utf8mb4.
FreeText = Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")

CURRENT = text("valid_to IS NULL")


def _id() -> Column[int]:
    return Column("id", Id, primary_key=True, autoincrement=True)


def _account_fk() -> Column[int]:
    return Column("account_id", Id, ForeignKey("accounts.id"), nullable=False)


def _run_fk(nullable: bool = False) -> Column[int]:
    return Column("run_id", Id, ForeignKey("sync_runs.id"), nullable=nullable)


def _validity() -> list[Column[Any]]:
    return [
        Column("valid_from", UTCDateTime(), nullable=False),
        Column("valid_to", UTCDateTime(), nullable=True),
        Column("row_hash", String(64), nullable=False),
        # 1 for the current row, NULL for closed ones: what MariaDB's unique index sees.
        Column(
            "is_current",
            Integer,
            Computed("CASE WHEN valid_to IS NULL THEN 1 END", persisted=True),
            nullable=True,
        ),
    ]


def _current_unique(name: str, *columns: str) -> Index:
    """At most one current row per key, enforced by the database (CONTRACT guarantee 2).

    Partial on PostgreSQL and SQLite. MariaDB has no partial indexes: there the index is on the
    key plus `is_current`, and closed rows, whose `is_current` is NULL, never collide.
    """
    return Index(
        name,
        *columns,
        "is_current",
        unique=True,
        sqlite_where=CURRENT,
        postgresql_where=CURRENT,
    )


accounts = Table(
    "accounts",
    metadata,
    _id(),
    Column("username", String(255), nullable=False, unique=True),
    Column("api_version", Integer, nullable=False),
    Column("enabled", Boolean, nullable=False),
    Column("first_seen_at", UTCDateTime(), nullable=False),
    Column("last_attempt_at", UTCDateTime()),
    Column("last_success_at", UTCDateTime()),
    Column("last_status", String(16)),
    Column("last_error", FreeText),
    Column("consecutive_failures", Integer, nullable=False, server_default="0"),
    # Work sharing (etl.claims): when the account is due next, and who holds it until when.
    Column("next_due_at", UTCDateTime()),
    Column("lease_owner", Id),
    Column("lease_expires_at", UTCDateTime()),
    # Claims walk enabled accounts in id order (etl.claims).
    Index("ix_accounts_enabled_id", "enabled", "id"),
)

sync_runs = Table(
    "sync_runs",
    metadata,
    _id(),
    Column("started_at", UTCDateTime(), nullable=False),
    Column("finished_at", UTCDateTime()),
    Column("status", String(16), nullable=False),
    Column("trigger", String(16), nullable=False),
    Column("accounts_total", Integer, nullable=False, server_default="0"),
    Column("accounts_succeeded", Integer, nullable=False, server_default="0"),
    Column("accounts_failed", Integer, nullable=False, server_default="0"),
    Column("accounts_changed", Integer, nullable=False, server_default="0"),
    Column("host", String(255)),
    Column("pid", Integer),
    Column("heartbeat_at", UTCDateTime()),  # refreshed while the run is alive
    Column("deadline_at", UTCDateTime()),  # when the daemon ends the run, finished or not
    Column("worker_id", Id),
    Column("error", FreeText),  # why a run failed or was aborted
    Index("ix_sync_runs_status", "status"),
)

# One row per trakt-etl process that syncs (a daemon, or a one-off `sync`), for liveness.
workers = Table(
    "workers",
    metadata,
    _id(),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("kind", String(16), nullable=False),  # daemon | sync
    Column("state", String(16), nullable=False),  # running | stopped
    Column("started_at", UTCDateTime(), nullable=False),
    Column("heartbeat_at", UTCDateTime(), nullable=False),
    Column("stopped_at", UTCDateTime()),
    Column("current_run_id", Id),
    Column("version", String(32)),
    Index("ix_workers_heartbeat_at", "heartbeat_at"),
)

account_syncs = Table(
    "account_syncs",
    metadata,
    _id(),
    _run_fk(),
    _account_fk(),
    Column("started_at", UTCDateTime(), nullable=False),
    Column("finished_at", UTCDateTime(), nullable=False),
    Column("status", String(16), nullable=False),
    Column("changed", Boolean, nullable=False),
    Column("http_status", Integer),
    Column("error_kind", String(32)),
    Column("error_message", FreeText),
    Column("attempts", Integer, nullable=False),
    Index("ix_account_syncs_account_id_run_id", "account_id", "run_id"),
    Index("ix_account_syncs_run_id", "run_id"),
)

raw_payloads = Table(
    "raw_payloads",
    metadata,
    _id(),
    _account_fk(),
    _run_fk(),
    Column("fetched_at", UTCDateTime(), nullable=False),
    Column("api_version", Integer, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("body", LongText, nullable=False),
    # The body's fields the normalizer does not know (a JSON list; NULL for none), so that an
    # unchanged answer, never decoded again, still reports them as `schema.drift`.
    Column("unknown_paths", LongText),
    Index("ix_raw_payloads_account_id_id", "account_id", "id"),
)

profile_history = Table(
    "profile_history",
    metadata,
    _id(),
    _account_fk(),
    _run_fk(),
    *_validity(),
    Column("username", String(255)),
    Column("full_name", FreeText),
    Column("gender", String(32)),
    Column("age", Integer),
    Column("location", FreeText),
    Column("about", FreeText),
    Column("joined_at", UTCDateTime()),
    Column("last_login_at", UTCDateTime()),
    Column("avatar_url", FreeText),
    Column("profile_url", FreeText),
    Column("vip", Boolean),
    Column("timezone", String(64)),
    Column("use_24hr", Boolean),
    Column("protected", Boolean),
    Column("ratings_mode", String(32)),
    Column("show_badges", Boolean),
    Column("show_spoilers", Boolean),
    Column("private", Boolean),
    Column("vip_ep", Boolean),
    Column("slug", String(255)),
    Column("uuid", String(64)),
    Column("date_format", String(32)),
    Column("cover_image_url", FreeText),
    _current_unique("uq_profile_history_current", "account_id"),
    Index("ix_profile_history_account_id_valid_from", "account_id", "valid_from"),
)

connection_history = Table(
    "connection_history",
    metadata,
    _id(),
    _account_fk(),
    _run_fk(),
    Column("network", String(64), nullable=False),
    *_validity(),
    *[Column(flag, Boolean) for flag in CONNECTION_FLAGS],
    _current_unique("uq_connection_history_current", "account_id", "network"),
    Index("ix_connection_history_account_id_valid_from", "account_id", "valid_from"),
)

sharing_text_history = Table(
    "sharing_text_history",
    metadata,
    _id(),
    _account_fk(),
    _run_fk(),
    Column("action", String(64), nullable=False),
    Column("text", FreeText),
    *_validity(),
    _current_unique("uq_sharing_text_history_current", "account_id", "action"),
    Index("ix_sharing_text_history_account_id_valid_from", "account_id", "valid_from"),
)

change_events = Table(
    "change_events",
    metadata,
    _id(),
    _run_fk(),
    _account_fk(),
    Column("changed_at", UTCDateTime(), nullable=False),
    Column("entity", String(16), nullable=False),
    Column("entity_key", String(64)),
    Column("field", String(64)),
    Column("change", String(16), nullable=False),
    Column("old_value", FreeText),
    Column("new_value", FreeText),
    Index("ix_change_events_account_id_changed_at", "account_id", "changed_at"),
    Index("ix_change_events_run_id", "run_id"),
)

HISTORY_TABLES = {
    "profile": profile_history,
    "connection": connection_history,
    "sharing_text": sharing_text_history,
}
