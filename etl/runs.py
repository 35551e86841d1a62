"""Bookkeeping tables: `accounts`, `sync_runs`, `account_syncs` and `raw_payloads`.

Small statements the sync pipeline calls inside its transactions; no decisions are made here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, bindparam, insert, select, update

from etl.bulk import insert_rows
from etl.models import account_syncs, accounts, raw_payloads, sync_runs


class RunStatus(StrEnum):
    RUNNING = "running"
    SUCCESS = "success"
    PARTIAL = "partial"
    FAILED = "failed"
    ABORTED = "aborted"


@dataclass(frozen=True, slots=True)
class AccountSpec:
    """What the config says of one account, as far as the `accounts` table cares."""

    username: str
    api_version: int
    enabled: bool


@dataclass(frozen=True, slots=True)
class RunCounts:
    total: int = 0
    succeeded: int = 0
    failed: int = 0
    changed: int = 0

    @property
    def status(self) -> RunStatus:
        if self.failed == 0:
            return RunStatus.SUCCESS
        return RunStatus.FAILED if self.succeeded == 0 else RunStatus.PARTIAL


def sync_accounts(
    connection: Connection, specs: Iterable[AccountSpec], now: datetime
) -> None:
    """Make `accounts` match the config: add new accounts, update changed ones.

    Accounts no longer in the config are disabled, never deleted: their history stays, and
    adding them back resumes it. The table is read as a stream (a server-side cursor where there
    is one) and the changes go in two statements, whatever the number of accounts.
    """
    wanted = {spec.username: spec for spec in specs}
    changed: list[dict[str, Any]] = []
    rows = connection.execute(
        select(
            accounts.c.id, accounts.c.username, accounts.c.api_version, accounts.c.enabled
        ).execution_options(yield_per=5_000)
    )
    for row in rows:
        spec = wanted.pop(row.username, None)  # what is left in `wanted` is new
        enabled, version = (spec.enabled, spec.api_version) if spec else (False, row.api_version)
        if (row.enabled, row.api_version) != (enabled, version):
            changed.append({"account": row.id, "now_enabled": enabled, "now_version": version})
    if wanted:
        # Several workers may add the same new accounts at once: the first one wins, quietly.
        connection.execute(
            _insert_ignoring_duplicates(connection),
            [
                {
                    "username": spec.username,
                    "api_version": spec.api_version,
                    "enabled": spec.enabled,
                    "first_seen_at": now,
                    "consecutive_failures": 0,
                }
                for spec in wanted.values()
            ],
        )
    if changed:
        connection.execute(
            update(accounts)
            .where(accounts.c.id == bindparam("account"))
            .values(enabled=bindparam("now_enabled"), api_version=bindparam("now_version")),
            changed,
        )


def _insert_ignoring_duplicates(connection: Connection) -> Any:
    from sqlalchemy.dialects import mysql, postgresql, sqlite  # only when accounts are new

    dialect = connection.dialect.name
    if dialect == "postgresql":
        return postgresql.insert(accounts).on_conflict_do_nothing(index_elements=["username"])
    if dialect == "sqlite":
        return sqlite.insert(accounts).on_conflict_do_nothing(index_elements=["username"])
    if dialect in ("mysql", "mariadb"):
        statement = mysql.insert(accounts)
        return statement.on_duplicate_key_update(username=statement.inserted.username)
    return insert(accounts)


def abort_runs(
    connection: Connection, run_ids: list[int], now: datetime, reason: str
) -> list[int]:
    """Close runs whose process died (`liveness.dead_runs` finds them) as `aborted`; return
    the ones this call closed.

    Two workers may find the same dead run at once: the database lets one UPDATE see the run
    still `running`, so exactly one of them closes (and reports) it. One statement per run, since
    MariaDB has no UPDATE ... RETURNING; dead runs are rare.
    """
    closed: list[int] = []
    for run_id in run_ids:
        result = connection.execute(
            update(sync_runs)
            .where(sync_runs.c.id == run_id, sync_runs.c.status == RunStatus.RUNNING)
            .values(status=RunStatus.ABORTED, finished_at=now, error=reason)
        )
        if result.rowcount:
            closed.append(run_id)
    return closed


def start_run(
    connection: Connection,
    *,
    started_at: datetime,
    trigger: str,
    total: int,
    host: str,
    worker_id: int | None = None,
    deadline_at: datetime | None = None,
) -> int:
    result = connection.execute(
        insert(sync_runs).values(
            started_at=started_at,
            heartbeat_at=started_at,
            deadline_at=deadline_at,
            status=RunStatus.RUNNING,
            trigger=trigger,
            accounts_total=total,
            host=host,
            pid=os.getpid(),
            worker_id=worker_id,
        )
    )
    key = result.inserted_primary_key
    assert key is not None
    return int(key[0])


def finish_run(
    connection: Connection,
    run_id: int,
    *,
    finished_at: datetime,
    counts: RunCounts,
    status: RunStatus | None = None,
    error: str | None = None,
) -> None:
    connection.execute(
        update(sync_runs)
        .where(sync_runs.c.id == run_id)
        .values(
            finished_at=finished_at,
            error=error,
            status=status or counts.status,
            accounts_total=counts.total,
            accounts_succeeded=counts.succeeded,
            accounts_failed=counts.failed,
            accounts_changed=counts.changed,
        )
    )


@dataclass(frozen=True, slots=True)
class StoredPayload:
    """A body that differs from the account's latest: a new raw_payloads row."""

    account_id: int
    fetched_at: datetime
    api_version: int
    sha256: str
    body: str
    unknown_paths: Sequence[str] = ()


def paths_text(paths: Sequence[str]) -> str | None:
    """Unknown paths as `raw_payloads.unknown_paths` stores them: a JSON list, NULL for none
    (the usual case costs nothing)."""
    return json.dumps(sorted(paths), ensure_ascii=False) if paths else None


def paths_of(stored: str | None) -> tuple[str, ...]:
    """The unknown paths stored with a body (`paths_text` read back)."""
    return tuple(json.loads(stored)) if stored else ()


def store_payloads(connection: Connection, run_id: int, payloads: Sequence[StoredPayload]) -> None:
    """The new bodies; each account's latest is what its next fetch is compared with."""
    insert_rows(
        connection,
        raw_payloads,
        [
            {
                "account_id": payload.account_id,
                "run_id": run_id,
                "fetched_at": payload.fetched_at,
                "api_version": payload.api_version,
                "sha256": payload.sha256,
                "body": payload.body,
                "unknown_paths": paths_text(payload.unknown_paths),
            }
            for payload in payloads
        ],
    )


@dataclass(frozen=True, slots=True)
class AccountOutcome:
    """How one account's sync ended, as `account_syncs` and `accounts` record it."""

    account_id: int
    started_at: datetime
    finished_at: datetime
    ok: bool
    changed: bool = False
    http_status: int | None = None
    error_kind: str | None = None
    error_message: str | None = None
    attempts: int = 1


def record_outcomes(
    connection: Connection,
    run_id: int,
    outcomes: Sequence[AccountOutcome],
    *,
    now: datetime,
    next_due_at: datetime | None = None,
) -> None:
    """The account_syncs rows, and each account's state: last attempt, due time, lease given up.

    A statement per batch: the accounts that succeeded share one UPDATE (their last attempt is
    the batch's `now`; account_syncs keeps each one's own times), the failed ones one
    executemany, since each keeps its own error.
    """
    if not outcomes:
        return
    insert_rows(
        connection,
        account_syncs,
        [
            {
                "run_id": run_id,
                "account_id": outcome.account_id,
                "started_at": outcome.started_at,
                "finished_at": outcome.finished_at,
                "status": "ok" if outcome.ok else "failed",
                "changed": outcome.changed,
                "http_status": outcome.http_status,
                "error_kind": outcome.error_kind,
                "error_message": outcome.error_message,
                "attempts": outcome.attempts,
            }
            for outcome in outcomes
        ],
    )
    done: dict[str, object] = {
        "last_attempt_at": now,
        "next_due_at": next_due_at,
        "lease_owner": None,
        "lease_expires_at": None,
    }
    succeeded = [outcome.account_id for outcome in outcomes if outcome.ok]
    if succeeded:
        connection.execute(
            update(accounts)
            .where(accounts.c.id.in_(succeeded))
            .values(
                {
                    **done,
                    "last_status": "ok",
                    "last_success_at": now,
                    "last_error": None,
                    "consecutive_failures": 0,
                }
            )
        )
    failed = [outcome for outcome in outcomes if not outcome.ok]
    if failed:
        connection.execute(
            update(accounts)
            .where(accounts.c.id == bindparam("account"))
            .values(
                {
                    **done,
                    "last_status": "failed",
                    "last_error": bindparam("error"),
                    "consecutive_failures": accounts.c.consecutive_failures + 1,
                }
            ),
            [{"account": outcome.account_id, "error": outcome.error_message} for outcome in failed],
        )
