"""Each account's latest body hash on the account itself: `accounts.payload_sha256`.

A worker claims an account and learns, in the same statement, the SHA-256 of the body stored
for it last; an unchanged answer then costs a hash, with no lookup in raw_payloads. Filled here
from each account's latest raw payload.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


_FLAGS = (
    "c.connected, c.timeline_enabled, c.share_scrobbles_start, c.share_scrobbles_end, "
    "c.share_tv, c.share_movies, c.share_ratings, c.share_checkins"
)
# The views that join accounts, as 0003 left them: SQLite rebuilds accounts to drop a column,
# and views over it must not be in the way.
VIEWS_ON_ACCOUNTS = {
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
    op.add_column("accounts", sa.Column("payload_sha256", sa.String(64), nullable=True))
    op.execute(
        "UPDATE accounts SET payload_sha256 = ("
        "SELECT r.sha256 FROM raw_payloads r WHERE r.id = ("
        "SELECT MAX(l.id) FROM raw_payloads l WHERE l.account_id = accounts.id))"
    )


def downgrade() -> None:
    for name in VIEWS_ON_ACCOUNTS:
        op.execute(f"DROP VIEW {name}")
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("payload_sha256")
    for name, select in VIEWS_ON_ACCOUNTS.items():
        op.execute(f"CREATE VIEW {name} AS {select}")
