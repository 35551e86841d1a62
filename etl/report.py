"""What `trakt-etl status` and `trakt-etl history USERNAME` show, read from the tables.

Two steps, kept apart: `status_report` and `history_report` read the database (SQLAlchemy Core
selects, the same on SQLite and PostgreSQL) into frozen dataclasses of plain data; `render_*`
draws those as rich tables for people, and `as_json` turns them into JSON for scripts. Every
timestamp is an aware UTC datetime in the reports and an ISO-8601 UTC string (``...Z``) in JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, is_dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

from rich.console import Console
from rich.table import Table
from rich.text import Text
from sqlalchemy import Connection, case, func, or_, select

from etl.errors import UsageError
from etl.models import account_syncs, accounts, change_events, sync_runs, workers

JSONValue: TypeAlias = "bool | int | float | str | list[JSONValue] | dict[str, JSONValue] | None"

STOPPED_WORKERS_SHOWN_FOR = timedelta(hours=1)
"""Stopped workers stay in the status report this long after they stopped."""


@dataclass(frozen=True, slots=True)
class RunLine:
    """One `sync_runs` row as the status report shows it."""

    id: int
    status: str
    trigger: str
    started_at: datetime
    finished_at: datetime | None
    duration_s: float | None  # None while the run has not finished
    accounts_total: int
    accounts_succeeded: int
    accounts_failed: int
    accounts_changed: int
    host: str | None
    pid: int | None
    error: str | None


@dataclass(frozen=True, slots=True)
class FailingAccount:
    """An enabled account whose latest sync failed, and since when it has been failing."""

    username: str
    consecutive_failures: int
    failing_since: datetime | None  # start of the first failed attempt after the last success
    last_error: str | None
    last_attempt_at: datetime | None


@dataclass(frozen=True, slots=True)
class WorkerLine:
    """One `workers` row (running, or stopped within the last hour) with its heartbeat age."""

    id: int
    host: str
    pid: int
    kind: str
    state: str
    started_at: datetime
    heartbeat_at: datetime
    heartbeat_age_s: float
    stale: bool  # running, but no heartbeat for longer than stale_after_s
    stopped_at: datetime | None
    current_run_id: int | None


@dataclass(frozen=True, slots=True)
class StatusReport:
    """What `trakt-etl status` shows: recent runs, failing accounts, workers, account counts."""

    generated_at: datetime
    runs: tuple[RunLine, ...]  # newest first
    failing: tuple[FailingAccount, ...]  # most consecutive failures first, then by username
    workers: tuple[WorkerLine, ...]  # running ones first, then by id
    accounts_enabled: int
    accounts_disabled: int


@dataclass(frozen=True, slots=True)
class ChangeLine:
    """One `change_events` row with its JSON values decoded."""

    changed_at: datetime
    run_id: int
    entity: str
    key: str | None  # entity_key: the network or sharing action; None for the profile
    field: str | None  # None when a whole row was added or removed
    change: str
    old: JSONValue
    new: JSONValue


@dataclass(frozen=True, slots=True)
class HistoryReport:
    """What `trakt-etl history USERNAME` shows: the account and its changes, oldest first."""

    username: str
    enabled: bool
    first_seen_at: datetime
    last_success_at: datetime | None
    total_changes: int  # all of the account's change events, however many `changes` holds
    changes: tuple[ChangeLine, ...]  # ordered by changed_at then id, newest last


def _utc(value: datetime) -> datetime:
    """An aware datetime in UTC; a naive one is refused rather than guessed at."""
    if value.tzinfo is None:
        raise ValueError("naive datetime given where UTC is required")
    return value.astimezone(UTC)


def _seconds(later: datetime, earlier: datetime) -> float:
    """Seconds from `earlier` to `later`."""
    return (later - earlier).total_seconds()


def _decode(value: str | None) -> JSONValue:
    """A JSON text column decoded; NULL stays None."""
    if value is None:
        return None
    decoded: JSONValue = json.loads(value)
    return decoded


def _recent_runs(connection: Connection, limit: int) -> tuple[RunLine, ...]:
    """The newest `limit` runs, newest first."""
    query = (
        select(sync_runs)
        .order_by(sync_runs.c.started_at.desc(), sync_runs.c.id.desc())
        .limit(limit)
    )
    return tuple(
        RunLine(
            id=row.id,
            status=row.status,
            trigger=row.trigger,
            started_at=row.started_at,
            finished_at=row.finished_at,
            duration_s=None
            if row.finished_at is None
            else _seconds(row.finished_at, row.started_at),
            accounts_total=row.accounts_total,
            accounts_succeeded=row.accounts_succeeded,
            accounts_failed=row.accounts_failed,
            accounts_changed=row.accounts_changed,
            host=row.host,
            pid=row.pid,
            error=row.error,
        )
        for row in connection.execute(query)
    )


def _failing_accounts(connection: Connection) -> tuple[FailingAccount, ...]:
    """Enabled accounts whose last sync failed, with the start of their current failing streak."""
    last_ok = (
        select(
            account_syncs.c.account_id,
            func.max(account_syncs.c.started_at).label("last_ok_at"),
        )
        .where(account_syncs.c.status == "ok")
        .group_by(account_syncs.c.account_id)
        .subquery("last_ok")
    )
    streak = (
        select(
            account_syncs.c.account_id,
            func.min(account_syncs.c.started_at).label("failing_since"),
        )
        .select_from(
            account_syncs.outerjoin(last_ok, last_ok.c.account_id == account_syncs.c.account_id)
        )
        .where(
            account_syncs.c.status == "failed",
            or_(
                last_ok.c.last_ok_at.is_(None),
                account_syncs.c.started_at > last_ok.c.last_ok_at,
            ),
        )
        .group_by(account_syncs.c.account_id)
        .subquery("streak")
    )
    query = (
        select(
            accounts.c.username,
            accounts.c.consecutive_failures,
            streak.c.failing_since,
            accounts.c.last_error,
            accounts.c.last_attempt_at,
        )
        .select_from(accounts.outerjoin(streak, streak.c.account_id == accounts.c.id))
        .where(accounts.c.last_status == "failed", accounts.c.enabled.is_(True))
        .order_by(accounts.c.consecutive_failures.desc(), accounts.c.username)
    )
    return tuple(
        FailingAccount(
            username=row.username,
            consecutive_failures=row.consecutive_failures,
            failing_since=row.failing_since,
            last_error=row.last_error,
            last_attempt_at=row.last_attempt_at,
        )
        for row in connection.execute(query)
    )


def _live_workers(
    connection: Connection, now: datetime, stale_after_s: float
) -> tuple[WorkerLine, ...]:
    """Running workers, and those stopped within the last hour, running ones first."""
    recent = now - STOPPED_WORKERS_SHOWN_FOR
    query = (
        select(workers)
        .where(
            or_(
                workers.c.state == "running",
                func.coalesce(workers.c.stopped_at, workers.c.heartbeat_at) >= recent,
            )
        )
        .order_by(case((workers.c.state == "running", 0), else_=1), workers.c.id)
    )
    lines: list[WorkerLine] = []
    for row in connection.execute(query):
        age = _seconds(now, row.heartbeat_at)
        lines.append(
            WorkerLine(
                id=row.id,
                host=row.host,
                pid=row.pid,
                kind=row.kind,
                state=row.state,
                started_at=row.started_at,
                heartbeat_at=row.heartbeat_at,
                heartbeat_age_s=age,
                stale=row.state == "running" and age > stale_after_s,
                stopped_at=row.stopped_at,
                current_run_id=row.current_run_id,
            )
        )
    return tuple(lines)


def status_report(
    connection: Connection, *, now: datetime, runs: int = 10, stale_after_s: float = 60
) -> StatusReport:
    """Read the recent runs, failing accounts, live workers and account counts as of `now`."""
    if runs < 0:
        raise UsageError(f"the number of runs to show must be 0 or more, got {runs}")
    now = _utc(now)
    counts: dict[bool, int] = {
        bool(enabled): int(number)
        for enabled, number in connection.execute(
            select(accounts.c.enabled, func.count()).group_by(accounts.c.enabled)
        )
    }
    return StatusReport(
        generated_at=now,
        runs=_recent_runs(connection, runs),
        failing=_failing_accounts(connection),
        workers=_live_workers(connection, now, stale_after_s),
        accounts_enabled=counts.get(True, 0),
        accounts_disabled=counts.get(False, 0),
    )


def history_report(
    connection: Connection, username: str, *, limit: int | None = None
) -> HistoryReport:
    """Read one account's change timeline (the newest `limit` changes when given), oldest first."""
    if limit is not None and limit < 0:
        raise UsageError(f"the number of changes to show must be 0 or more, got {limit}")
    account = connection.execute(
        select(
            accounts.c.id,
            accounts.c.username,
            accounts.c.enabled,
            accounts.c.first_seen_at,
            accounts.c.last_success_at,
        ).where(accounts.c.username == username)
    ).one_or_none()
    if account is None:
        raise UsageError(f"no account named {username!r}")
    total = connection.execute(
        select(func.count())
        .select_from(change_events)
        .where(change_events.c.account_id == account.id)
    ).scalar_one()
    # Newest first in SQL so that LIMIT keeps the newest; turned around below.
    query = (
        select(change_events)
        .where(change_events.c.account_id == account.id)
        .order_by(change_events.c.changed_at.desc(), change_events.c.id.desc())
    )
    if limit is not None:
        query = query.limit(limit)
    changes = [
        ChangeLine(
            changed_at=row.changed_at,
            run_id=row.run_id,
            entity=row.entity,
            key=row.entity_key,
            field=row.field,
            change=row.change,
            old=_decode(row.old_value),
            new=_decode(row.new_value),
        )
        for row in connection.execute(query)
    ]
    changes.reverse()
    return HistoryReport(
        username=account.username,
        enabled=bool(account.enabled),
        first_seen_at=account.first_seen_at,
        last_success_at=account.last_success_at,
        total_changes=int(total),
        changes=tuple(changes),
    )


# ---- JSON -----------------------------------------------------------------------------------


def iso_utc(value: datetime) -> str:
    """An aware datetime as ISO-8601 UTC with a ``Z``, as the JSON logs write timestamps."""
    return _utc(value).isoformat().replace("+00:00", "Z")


def _plain(value: Any) -> Any:
    """Dataclasses, tuples and datetimes turned into JSON-ready dicts, lists and strings."""
    if isinstance(value, datetime):
        return iso_utc(value)
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    return value


def as_json(report: StatusReport | HistoryReport) -> str:
    """The report as JSON text for scripts: the dataclass fields in order, datetimes as strings."""
    return json.dumps(_plain(report), indent=2, ensure_ascii=False)


# ---- rich -----------------------------------------------------------------------------------


def _when(value: datetime | None) -> str:
    """A timestamp for people: UTC to the second."""
    return "" if value is None else _utc(value).strftime("%Y-%m-%d %H:%M:%S")


def _span(seconds: float | None) -> str:
    """A duration for people: 0.42s, 12.3s, 4m 05s, 2h 03m, 3d 04h."""
    if seconds is None:
        return ""
    if seconds < 0:
        return f"-{_span(-seconds)}"
    if seconds < 60:
        return f"{seconds:.2f}s" if seconds < 10 else f"{seconds:.1f}s"
    whole = int(seconds)
    minutes, secs = divmod(whole, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s"


def _compact(value: JSONValue) -> str:
    """A decoded JSON value as short text: a whole row shows its non-null fields."""
    if value is None:
        return ""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={v}" for k, v in value.items() if v is not None) + "}"
    return json.dumps(value, ensure_ascii=False)


def _cell(value: object) -> Text:
    """A table cell as plain text: values such as "[item]" must not be read as rich markup."""
    if value is None:
        return Text("")
    if isinstance(value, Text):
        return value
    return Text(str(value))


def _table(title: str, headers: tuple[str, ...], rows: list[tuple[object, ...]]) -> Table:
    """A titled rich table of plain-text cells."""
    table = Table(title=title, title_justify="left")
    for header in headers:
        table.add_column(header, overflow="fold")
    for row in rows:
        table.add_row(*(_cell(value) for value in row))
    return table


RUN_STYLES = {
    "success": "green",
    "partial": "yellow",
    "failed": "red",
    "aborted": "red",
    "running": "cyan",
}


def render_status(report: StatusReport, console: Console) -> None:
    """Print the status report as rich tables: runs, failing accounts, workers."""
    console.print(
        Text.assemble(
            ("Status", "bold"),
            f" at {_when(report.generated_at)} UTC: {report.accounts_enabled} accounts enabled, "
            f"{report.accounts_disabled} disabled, {len(report.failing)} failing",
        )
    )
    if report.runs:
        console.print(
            _table(
                f"Recent runs (newest first, {len(report.runs)})",
                (
                    "run",
                    "status",
                    "trigger",
                    "started (UTC)",
                    "duration",
                    "total",
                    "ok",
                    "failed",
                    "changed",
                    "host",
                    "pid",
                    "error",
                ),
                [
                    (
                        run.id,
                        Text(run.status, style=RUN_STYLES.get(run.status, "")),
                        run.trigger,
                        _when(run.started_at),
                        "running" if run.duration_s is None else _span(run.duration_s),
                        run.accounts_total,
                        run.accounts_succeeded,
                        run.accounts_failed,
                        run.accounts_changed,
                        run.host,
                        run.pid,
                        run.error,
                    )
                    for run in report.runs
                ],
            )
        )
    else:
        console.print("No sync runs yet.")
    if report.failing:
        console.print(
            _table(
                "Failing accounts",
                ("username", "failures", "failing since (UTC)", "last attempt (UTC)", "last error"),
                [
                    (
                        account.username,
                        account.consecutive_failures,
                        _when(account.failing_since),
                        _when(account.last_attempt_at),
                        account.last_error,
                    )
                    for account in report.failing
                ],
            )
        )
    else:
        console.print("No failing accounts.")
    if report.workers:
        console.print(
            _table(
                "Workers (running, or stopped within the last hour)",
                (
                    "worker",
                    "host",
                    "pid",
                    "kind",
                    "state",
                    "started (UTC)",
                    "heartbeat age",
                    "run",
                ),
                [
                    (
                        worker.id,
                        worker.host,
                        worker.pid,
                        worker.kind,
                        Text("stale", style="bold red")
                        if worker.stale
                        else Text(worker.state, style="green" if worker.state == "running" else ""),
                        _when(worker.started_at),
                        _span(worker.heartbeat_age_s),
                        worker.current_run_id,
                    )
                    for worker in report.workers
                ],
            )
        )
    else:
        console.print("No workers running or recently stopped.")


def render_history(report: HistoryReport, console: Console) -> None:
    """Print one account's change timeline as a rich table, oldest first."""
    state = "enabled" if report.enabled else "disabled"
    console.print(
        Text.assemble(
            (report.username, "bold"),
            f" ({state}): first seen {_when(report.first_seen_at)} UTC, last success "
            f"{_when(report.last_success_at) + ' UTC' if report.last_success_at else 'never'}",
        )
    )
    if not report.changes:
        console.print("No changes recorded.")
        return
    shown = len(report.changes)
    title = (
        f"Changes ({shown}, oldest first)"
        if shown == report.total_changes
        else f"The newest {shown} of {report.total_changes} changes (oldest first)"
    )
    console.print(
        _table(
            title,
            ("changed at (UTC)", "run", "entity", "key", "field", "change", "old", "new"),
            [
                (
                    _when(change.changed_at),
                    change.run_id,
                    change.entity,
                    change.key,
                    change.field,
                    change.change,
                    _compact(change.old),
                    _compact(change.new),
                )
                for change in report.changes
            ],
        )
    )
