"""Work sharing and MariaDB: account due times and leases; current-row uniqueness without
partial indexes; room for long text on MySQL/MariaDB.

- `accounts.next_due_at`, `lease_owner`, `lease_expires_at`: workers claim due accounts with
  SELECT ... FOR UPDATE SKIP LOCKED and lease them (etl.claims).
- History tables get `is_current`, a stored generated column that is 1 for the current row and
  NULL otherwise, and the current-row unique indexes cover it. On PostgreSQL and SQLite they stay
  partial (WHERE valid_to IS NULL); MariaDB has no partial indexes, and there the NULLs of closed
  rows keep them out of the unique index: the database enforces one current row either way.
- On MySQL/MariaDB, free text becomes MEDIUMTEXT (TEXT holds 64 KiB, not 65,536 characters).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TIMESTAMP = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
CURRENT = sa.text("valid_to IS NULL")

# (table, unique index, its key columns)
CURRENT_INDEXES = (
    ("profile_history", "uq_profile_history_current", ["account_id"]),
    ("connection_history", "uq_connection_history_current", ["account_id", "network"]),
    ("sharing_text_history", "uq_sharing_text_history_current", ["account_id", "action"]),
)
FREE_TEXT = {
    "profile_history": [
        "full_name",
        "location",
        "about",
        "avatar_url",
        "profile_url",
        "cover_image_url",
    ],
    "sharing_text_history": ["text"],
    "change_events": ["old_value", "new_value"],
    "accounts": ["last_error"],
    "account_syncs": ["error_message"],
    "sync_runs": ["error"],
}

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


def _is_current() -> sa.Column[int]:
    return sa.Column(
        "is_current",
        sa.Integer(),
        sa.Computed("CASE WHEN valid_to IS NULL THEN 1 END", persisted=True),
        nullable=True,
    )


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    # SQLite rebuilds tables to add a stored column; views over them must not be in the way.
    for name in VIEWS:
        op.execute(f"DROP VIEW {name}")
    with op.batch_alter_table("accounts") as batch:
        batch.add_column(sa.Column("next_due_at", TIMESTAMP, nullable=True))
        batch.add_column(sa.Column("lease_owner", ID, nullable=True))
        batch.add_column(sa.Column("lease_expires_at", TIMESTAMP, nullable=True))
    op.create_index("ix_accounts_due", "accounts", ["enabled", "next_due_at"], unique=False)
    for table, index, columns in CURRENT_INDEXES:
        with op.batch_alter_table(
            table, recreate="always" if dialect == "sqlite" else "auto"
        ) as batch:
            batch.drop_index(index)
            batch.add_column(_is_current())
            batch.create_index(
                index,
                [*columns, "is_current"],
                unique=True,
                sqlite_where=CURRENT,
                postgresql_where=CURRENT,
            )
    if dialect in ("mysql", "mariadb"):
        for table, columns in FREE_TEXT.items():
            for column in columns:
                op.alter_column(table, column, type_=mysql.MEDIUMTEXT(), existing_nullable=True)
    for name, select in VIEWS.items():
        op.execute(f"CREATE VIEW {name} AS {select}")


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    for name in VIEWS:
        op.execute(f"DROP VIEW {name}")
    if dialect in ("mysql", "mariadb"):
        for table, columns in FREE_TEXT.items():
            for column in columns:
                op.alter_column(table, column, type_=sa.Text(), existing_nullable=True)
    for table, index, columns in CURRENT_INDEXES:
        with op.batch_alter_table(
            table, recreate="always" if dialect == "sqlite" else "auto"
        ) as batch:
            batch.drop_index(index)
            batch.drop_column("is_current")
            batch.create_index(
                index, columns, unique=True, sqlite_where=CURRENT, postgresql_where=CURRENT
            )
    op.drop_index("ix_accounts_due", table_name="accounts")
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("lease_expires_at")
        batch.drop_column("lease_owner")
        batch.drop_column("next_due_at")
    for name, select in VIEWS.items():
        op.execute(f"CREATE VIEW {name} AS {select}")
