"""Sharing accounts between workers: due times and leases that the database enforces.

Every account has a `next_due_at`: the start of the next schedule window after the one it was
last synced in. A worker claims due accounts in small batches with
``SELECT ... FOR UPDATE SKIP LOCKED`` (PostgreSQL, MariaDB) and marks them leased to itself
until `lease_expires_at`; its heartbeat renews the lease while it works. Writing an account's
result moves its `next_due_at` on and clears the lease in the same transaction. A worker that
dies stops renewing, its leases expire, and the others take its accounts. So each due account is
synced by exactly one worker per window, and one process alone behaves as before. On SQLite one
process holds the database at a time (`etl.dblock`), and the same statements simply run alone.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Select, and_, func, or_, select, update

from etl.models import accounts, raw_payloads
from etl.runs import paths_of

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def next_window(as_of: datetime, period_s: float) -> datetime:
    """The start of the schedule window after the one `as_of` falls in (windows are aligned to
    the epoch, so every worker computes the same ones)."""
    elapsed = (as_of - EPOCH).total_seconds()
    return EPOCH + timedelta(seconds=(math.floor(elapsed / period_s) + 1) * period_s)


@dataclass(frozen=True, slots=True)
class Claim:
    account_id: int
    username: str
    payload_sha256: str | None = None  # of the body stored last: the same answer changes nothing
    # The fields of that body the normalizer does not know: the same answer reports them again.
    unknown_paths: tuple[str, ...] = ()


def _free(now: datetime) -> object:
    return or_(accounts.c.lease_expires_at.is_(None), accounts.c.lease_expires_at < now)


def _due(now: datetime) -> object:
    return or_(accounts.c.next_due_at.is_(None), accounts.c.next_due_at <= now)


def _latest_payload(column: Any) -> Any:
    """A column of the account's latest raw payload: one step back along the (account_id, id)
    index, for each account claimed."""
    return (
        select(column)
        .where(raw_payloads.c.account_id == accounts.c.id)
        .order_by(raw_payloads.c.id.desc())
        .limit(1)
        .correlate(accounts)
        .scalar_subquery()
    )


def _latest_payload_columns() -> list[Any]:
    """What a claim brings of the latest payload: its hash and its unknown paths.

    Two scalar subqueries rather than a join: PostgreSQL refuses FOR UPDATE on the nullable
    side of an outer join, and each is the same short index step.
    """
    return [
        _latest_payload(raw_payloads.c.sha256).label("sha256"),
        _latest_payload(raw_payloads.c.unknown_paths).label("unknown_paths"),
    ]


def claim(
    connection: Connection,
    *,
    worker_id: int | None,
    now: datetime,
    lease_s: float,
    limit: int,
    only: Collection[str] | None = None,
    due_at: datetime | None = None,
    attempted_before: datetime | None = None,
    after_id: int = 0,
) -> list[Claim]:
    """Lease up to `limit` free accounts to this worker: those due at `due_at` (a scheduled
    run's start, so that a run longer than its window never takes an account twice), or (a
    manual run) those not attempted since `attempted_before`, when that run began.

    Accounts are taken in id order from `after_id` on (the last id of the previous batch): a run
    walks the table once instead of rescanning the accounts it has done at every batch, which
    made a run of N accounts cost N²/batch row visits. Rows another worker is claiming this
    very moment are skipped, not waited for.
    """
    conditions = [accounts.c.enabled.is_(True), _free(now), accounts.c.id > after_id]
    if due_at is not None:
        conditions.append(_due(due_at))
    if attempted_before is not None:
        conditions.append(
            or_(
                accounts.c.last_attempt_at.is_(None),
                accounts.c.last_attempt_at < attempted_before,
            )
        )
    if only is not None:
        conditions.append(accounts.c.username.in_(list(only)))
    query = (
        select(accounts.c.id, accounts.c.username, *_latest_payload_columns())
        .where(and_(*conditions))  # type: ignore[arg-type]
        .order_by(accounts.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    found = [
        Claim(int(row.id), str(row.username), row.sha256, paths_of(row.unknown_paths))
        for row in connection.execute(query)
    ]
    if found:
        connection.execute(
            update(accounts)
            .where(accounts.c.id.in_([c.account_id for c in found]))
            .values(lease_owner=worker_id, lease_expires_at=now + timedelta(seconds=lease_s))
        )
    return found


def count_due(connection: Connection, now: datetime) -> int:
    query = (
        select(func.count())
        .select_from(accounts)
        .where(
            accounts.c.enabled.is_(True),
            _due(now),  # type: ignore[arg-type]
        )
    )
    return int(connection.execute(query).scalar_one())


def renew(connection: Connection, worker_id: int, now: datetime, lease_s: float) -> int:
    """Extend the leases this worker holds (its heartbeat); returns how many."""
    result = connection.execute(
        update(accounts)
        .where(accounts.c.lease_owner == worker_id, accounts.c.lease_expires_at >= now)
        .values(lease_expires_at=now + timedelta(seconds=lease_s))
    )
    return int(result.rowcount)


def release_owned_by(connection: Connection, owners: Select[Any]) -> None:
    """Free every account leased by these workers (they died: no need to wait out the lease)."""
    connection.execute(
        update(accounts)
        .where(accounts.c.lease_owner.in_(owners.scalar_subquery()))
        .values(lease_owner=None, lease_expires_at=None)
    )


def release(connection: Connection, account_ids: Sequence[int]) -> None:
    """Give back accounts claimed but not synced (a stopped run), for others to take now."""
    if account_ids:
        connection.execute(
            update(accounts)
            .where(accounts.c.id.in_(list(account_ids)))
            .values(lease_owner=None, lease_expires_at=None)
        )
