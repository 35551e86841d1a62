"""One sync run: fetch every due account, normalize, diff, and write each account atomically.

The pipeline takes its seams as arguments (an engine, a client, a clock) and owns the order of
things: bookkeeping first, then one transaction per account, then the run's closing line. The
clock is read once per run: that `as_of` becomes every new row's valid_from.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError

from etl import runs
from etl.client import Fetched, TraktClient, adapter_for
from etl.config import AccountConfig, Config
from etl.diff import diff_rows
from etl.errors import DatabaseError, ErrorKind, FetchError, InvalidPayloadError, UsageError
from etl.history import load_current, write_history
from etl.records import Change, Snapshot
from etl.redact import Redactor, account_secrets

log = structlog.get_logger("etl.sync")

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class AccountResult:
    username: str
    ok: bool
    changes: tuple[Change, ...] = ()
    error: FetchError | None = None
    unknown_paths: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.changes)


@dataclass(frozen=True, slots=True)
class RunSummary:
    run_id: int
    status: runs.RunStatus
    counts: runs.RunCounts
    duration_ms: int
    results: tuple[AccountResult, ...] = field(default=(), repr=False)


def select_accounts(config: Config, only: Sequence[str] | None) -> list[AccountConfig]:
    """The enabled accounts to sync, or just the named ones (each must be configured)."""
    enabled = config.enabled_accounts()
    if not only:
        return enabled
    by_name = {account.username: account for account in config.accounts}
    unknown = [name for name in only if name not in by_name]
    if unknown:
        raise UsageError(f"--account {', '.join(unknown)}: not in the config's accounts")
    disabled = [name for name in only if not by_name[name].enabled]
    if disabled:
        raise UsageError(f"--account {', '.join(disabled)}: disabled in the config")
    return [by_name[name] for name in dict.fromkeys(only)]


class Syncer:
    """Runs syncs of the configured accounts against one database through one client."""

    def __init__(
        self,
        engine: Engine,
        config: Config,
        client: TraktClient,
        *,
        clock: Clock = utc_now,
    ) -> None:
        self._engine = engine
        self._config = config
        self._client = client
        self._clock = clock
        self._redactor = Redactor(config.secrets())

    def run(self, *, trigger: str = "manual", only: Sequence[str] | None = None) -> RunSummary:
        """Sync the selected accounts once; database failures raise `DatabaseError`."""
        targets = select_accounts(self._config, only)
        as_of = self._clock()
        started = time.monotonic()
        try:
            run_id, ids = self._open_run(targets, as_of, trigger)
        except SQLAlchemyError as exc:
            raise DatabaseError(f"cannot start the run: {_db_reason(exc)}") from exc
        with structlog.contextvars.bound_contextvars(run_id=run_id):
            log.info("run.started", accounts=len(targets), trigger=trigger)
            results = [self._sync_one(run_id, ids[a.username], a, as_of) for a in targets]
            return self._close_run(run_id, results, started)

    def _open_run(
        self, targets: Sequence[AccountConfig], as_of: datetime, trigger: str
    ) -> tuple[int, dict[str, int]]:
        specs = [
            runs.AccountSpec(a.username, self._config.version_of(a), a.enabled)
            for a in self._config.accounts
        ]
        with self._engine.begin() as connection:
            for dead in runs.abort_dead_runs(connection, as_of):
                log.warning(
                    "run.aborted_found",
                    dead_run_id=dead,
                    reason="left running by a process that stopped",
                )
            ids = runs.sync_accounts(connection, specs, as_of)
            run_id = runs.start_run(
                connection, started_at=as_of, trigger=trigger, total=len(targets)
            )
        return run_id, ids

    def _sync_one(
        self, run_id: int, account_id: int, account: AccountConfig, as_of: datetime
    ) -> AccountResult:
        with (
            structlog.contextvars.bound_contextvars(username=account.username),
            account_secrets(account.secrets()),
        ):
            started_at, started = self._clock(), time.monotonic()
            try:
                fetched = self._client.fetch(account, self._config.version_of(account))
                snapshot = _normalize(fetched)
                changes = self._write(run_id, account_id, fetched, snapshot, as_of, started_at)
            except FetchError as error:
                self._record_failure(run_id, account_id, started_at, error)
                return AccountResult(account.username, ok=False, error=error)
            except DatabaseError:
                raise
            except Exception as exc:  # a bug must not cost the other accounts their sync
                log.exception("account.internal_error")
                internal = FetchError(ErrorKind.INTERNAL, f"{type(exc).__name__}: {exc}")
                self._record_failure(run_id, account_id, started_at, internal)
                return AccountResult(account.username, ok=False, error=internal)
            duration_ms = round((time.monotonic() - started) * 1000)
            if changes:
                log.info("account.changed", changes=[c.as_log() for c in changes])
            log.info(
                "account.synced",
                changed=bool(changes),
                duration_ms=duration_ms,
                attempts=fetched.attempts,
            )
            return AccountResult(
                account.username,
                ok=True,
                changes=tuple(changes),
                unknown_paths=snapshot.unknown_paths,
            )

    def _write(
        self,
        run_id: int,
        account_id: int,
        fetched: Fetched,
        snapshot: Snapshot,
        as_of: datetime,
        started_at: datetime,
    ) -> list[Change]:
        """Everything of one account in one transaction: history, events, payload, bookkeeping."""
        try:
            with self._engine.begin() as connection:
                current = load_current(connection, account_id)
                changes = diff_rows([item.row for item in current], snapshot.rows())
                write_history(
                    connection,
                    account_id=account_id,
                    run_id=run_id,
                    as_of=as_of,
                    current=current,
                    fetched=snapshot,
                    changes=changes,
                )
                sha = hashlib.sha256(fetched.body.encode("utf-8")).hexdigest()
                if runs.latest_payload_sha(connection, account_id) != sha:
                    runs.store_payload(
                        connection,
                        account_id=account_id,
                        run_id=run_id,
                        fetched_at=started_at,
                        api_version=fetched.api_version,
                        sha256=sha,
                        body=fetched.body,
                    )
                runs.record_outcome(
                    connection,
                    run_id,
                    runs.AccountOutcome(
                        account_id=account_id,
                        started_at=started_at,
                        finished_at=self._clock(),
                        ok=True,
                        changed=bool(changes),
                        http_status=fetched.http_status,
                        attempts=fetched.attempts,
                    ),
                )
        except DBAPIError as exc:
            if exc.connection_invalidated or _is_unreachable(exc):
                raise DatabaseError(f"database lost during the run: {_db_reason(exc)}") from exc
            # The database refused this account's data (a NUL byte in PostgreSQL text, say).
            raise FetchError(
                ErrorKind.STORAGE,
                f"the database refused the data: {_db_reason(exc)}",
                http_status=fetched.http_status,
                attempts=fetched.attempts,
            ) from exc
        return changes

    def _record_failure(
        self, run_id: int, account_id: int, started_at: datetime, error: FetchError
    ) -> None:
        message = self._redactor.redact(error.message)
        try:
            with self._engine.begin() as connection:
                runs.record_outcome(
                    connection,
                    run_id,
                    runs.AccountOutcome(
                        account_id=account_id,
                        started_at=started_at,
                        finished_at=self._clock(),
                        ok=False,
                        http_status=error.http_status,
                        error_kind=str(error.kind),
                        error_message=message,
                        attempts=error.attempts,
                    ),
                )
        except SQLAlchemyError as exc:
            raise DatabaseError(f"cannot record a failed account: {_db_reason(exc)}") from exc
        log.warning(
            "account.failed",
            error_kind=str(error.kind),
            error=message,
            http_status=error.http_status,
            attempts=error.attempts,
        )

    def _close_run(
        self, run_id: int, results: Sequence[AccountResult], started: float
    ) -> RunSummary:
        drift = sorted({path for result in results for path in result.unknown_paths})
        if drift:
            log.warning("schema.drift", paths=drift)
        counts = runs.RunCounts(
            total=len(results),
            succeeded=sum(r.ok for r in results),
            failed=sum(not r.ok for r in results),
            changed=sum(r.changed for r in results),
        )
        try:
            with self._engine.begin() as connection:
                runs.finish_run(connection, run_id, finished_at=self._clock(), counts=counts)
        except SQLAlchemyError as exc:
            raise DatabaseError(f"cannot close the run: {_db_reason(exc)}") from exc
        duration_ms = round((time.monotonic() - started) * 1000)
        log.info(
            "run.finished",
            status=str(counts.status),
            total=counts.total,
            succeeded=counts.succeeded,
            failed=counts.failed,
            changed=counts.changed,
            duration_ms=duration_ms,
        )
        return RunSummary(run_id, counts.status, counts, duration_ms, tuple(results))


def _normalize(fetched: Fetched) -> Snapshot:
    try:
        return adapter_for(fetched.api_version).normalize(fetched.payload)
    except InvalidPayloadError as exc:
        raise FetchError(
            ErrorKind.INVALID_RESPONSE,
            str(exc),
            http_status=fetched.http_status,
            attempts=fetched.attempts,
        ) from exc


def _db_reason(exc: SQLAlchemyError) -> str:
    original: Any = getattr(exc, "orig", None) or exc
    return str(original).strip().splitlines()[0] if str(original).strip() else type(exc).__name__


def _is_unreachable(exc: DBAPIError) -> bool:
    return isinstance(exc, (OperationalError, InterfaceError)) and not _is_lock_timeout(exc)


def _is_lock_timeout(exc: DBAPIError) -> bool:
    return "locked" in str(exc.orig).lower()
