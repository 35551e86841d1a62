"""raw_payloads.unknown_paths: the fields of a stored body that the normalizer does not know.

An answer byte for byte the same as the account's latest raw payload is not decoded again (the
unchanged short-cut), so nothing would find its unknown fields, and `schema.drift` went silent
after the run that first received them. The paths are now stored with the body (a JSON list,
NULL when there are none) and claimed with its hash, so every run that receives the body
reports them. Bodies stored before this revision have NULL: their drift is reported again
once their body changes.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As long as the body it comes from, at worst: LONGTEXT on MySQL/MariaDB, as `body` is.
LONG_TEXT = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")


def upgrade() -> None:
    # A nullable column: SQLite, PostgreSQL and MariaDB add it in place, without a rewrite.
    with op.batch_alter_table("raw_payloads") as batch:
        batch.add_column(sa.Column("unknown_paths", LONG_TEXT, nullable=True))


def downgrade() -> None:
    # SQLite rebuilds the table here (no view reads raw_payloads, so none is in the way).
    with op.batch_alter_table("raw_payloads") as batch:
        batch.drop_column("unknown_paths")
