"""Claims walk accounts in id order: an index on (enabled, id) instead of (enabled, next_due_at).

A claim asks for the next enabled accounts after the last one it took, in id order. With only
(enabled, next_due_at) to go by, SQLite read every enabled account and sorted them for each
claim, which made a run quadratic in the number of accounts; (enabled, id) serves the filter,
the range and the order at once.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_accounts_due", table_name="accounts")
    op.create_index("ix_accounts_enabled_id", "accounts", ["enabled", "id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_accounts_enabled_id", table_name="accounts")
    op.create_index("ix_accounts_due", "accounts", ["enabled", "next_due_at"], unique=False)
