"""One sync run: fetch every due account, normalize, diff, and write each account atomically.

The pipeline takes its seams as arguments (an engine, a client, a clock) and owns the order of
things: bookkeeping first, then one transaction per account, then the run's closing line. The
clock is read once per run: that `as_of` becomes every new row's valid_from.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError

from etl import claims, liveness, runs
from etl.client import Fetched, TraktClient, adapter_for
from etl.config import AccountConfig, Config
from etl.diff import diff_rows
from etl.errors import (
    DatabaseError,
    ErrorKind,
    FetchError,
    InvalidPayloadError,
    Stopped,
    UsageError,
)
from etl.history import load_current, write_history
from etl.records import Change, Snapshot
from etl.redact import Redactor, account_secrets, current_account_redactor

log = structlog.get_logger("etl.sync")

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


class RunControl:
    """How a run is told to end early: a stop (a signal) or a deadline, whichever comes first.

    The stop event is shared with the client, so its rate-limit waits and retry backoffs end
    at once too.
    """

    def __init__(self, *, deadline_s: float | None = None, stop: threading.Event | None = None):
        self.stop = stop or threading.Event()
        self.deadline = None if deadline_s is None else time.monotonic() + deadline_s
        self.deadline_s = deadline_s
        self._reason: str | None = None

    def request_stop(self, reason: str) -> None:
        if self._reason is None:
            self._reason = reason
        self.stop.set()

    def reason(self) -> str | None:
        """Why the run must end now, or None to go on."""
        if self.stop.is_set():
            return self._reason or "stopped"
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.request_stop(f"the run deadline of {self.deadline_s:g}s passed")
            return self._reason
        return None

    def time_left(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())


@dataclass(frozen=True, slots=True)
class Attempt:
    """What a fetch worker hands the writer for one account: the answer or the failure."""

    claim: claims.Claim
    account: AccountConfig
    started_at: datetime
    started: float  # monotonic, for duration_ms
    fetched: Fetched | None = None
    snapshot: Snapshot | None = None
    error: FetchError | None = None


@dataclass(slots=True)
class _Plan:
    """What one run syncs, and what it has claimed but not yet written."""

    by_name: dict[str, AccountConfig]
    only: list[str] | None
    due_only: bool
    as_of: datetime
    next_due_at: datetime
    unwritten: set[int] = field(default_factory=set)
    skipped: set[int] = field(default_factory=set)


@dataclass(slots=True)
class Tally:
    """The run's running totals; nothing per account is kept, so memory stays flat."""

    total: int = 0
    succeeded: int = 0
    failed: int = 0
    changed: int = 0
    drift: set[str] = field(default_factory=set)

    def counts(self) -> runs.RunCounts:
        return runs.RunCounts(self.total, self.succeeded, self.failed, self.changed)


@dataclass(frozen=True, slots=True)
class RunSummary:
    run_id: int
    status: runs.RunStatus
    counts: runs.RunCounts
    duration_ms: int


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
        control: RunControl | None = None,
        worker_id: int | None = None,
        stale_after_s: float = liveness.stale_after(liveness.DEFAULT_HEARTBEAT_S),
    ) -> None:
        self._stale_after_s = stale_after_s
        self._engine = engine
        self._config = config
        self._client = client
        self._clock = clock
        self._control = control or RunControl()
        self._worker_id = worker_id
        self._redactor = Redactor(config.global_secrets())

    def run(self, *, trigger: str = "manual", only: Sequence[str] | None = None) -> RunSummary:
        """Sync the selected accounts once; database failures raise `DatabaseError`.

        A stop or a deadline (`RunControl`) ends the run early: the account being written
        commits, the others are left wholly as they were, and the run is closed `aborted`.
        """
        targets = select_accounts(self._config, only)
        scheduled = trigger == "schedule"
        as_of = self._clock()
        started = time.monotonic()
        try:
            run_id, expected = self._open_run(targets, as_of, trigger, due_only=scheduled)
        except SQLAlchemyError as exc:
            raise DatabaseError(f"cannot start the run: {_db_reason(exc)}") from exc
        plan = _Plan(
            by_name={a.username: a for a in targets},
            only=None if not only else list(dict.fromkeys(only)),
            due_only=scheduled,
            as_of=as_of,
            next_due_at=claims.next_window(as_of, self._config.schedule.period_s()),
        )
        with (
            structlog.contextvars.bound_contextvars(run_id=run_id),
            self._writer() as writer,
        ):
            log.info("run.started", accounts=expected, trigger=trigger)
            tally = Tally()
            for attempt in self._fetch_all(run_id, self._claimed(plan)):
                self._store(writer, run_id, attempt, as_of, plan.next_due_at, tally)
                plan.unwritten.discard(attempt.claim.account_id)
            left = len(plan.unwritten)
            reason = self._control.reason()
            self._release(plan)
            return self._close_run(writer, run_id, tally, started, left=left, reason=reason)

    def _claimed(self, plan: _Plan) -> Iterator[tuple[claims.Claim, AccountConfig]]:
        """Accounts this worker may sync now, leased to it in small batches as it goes.

        A scheduled run takes the due ones; a manual run every selected account it has not
        synced yet (last attempted before the run began). Accounts another worker holds are
        skipped: they are being synced already.
        """
        batch = max(10, 4 * self._config.api.concurrency)
        lease_s = self._stale_after_s
        while self._control.reason() is None:
            try:
                with self._engine.begin() as connection:
                    found = claims.claim(
                        connection,
                        worker_id=self._worker_id,
                        now=self._clock(),
                        lease_s=lease_s,
                        limit=batch,
                        only=plan.only,
                        due_at=plan.as_of if plan.due_only else None,
                        attempted_before=None if plan.due_only else plan.as_of,
                    )
            except SQLAlchemyError as exc:
                raise DatabaseError(f"cannot claim accounts: {_db_reason(exc)}") from exc
            if not found:
                return
            strangers = [c for c in found if c.username not in plan.by_name]
            if strangers:
                # Enabled in the database, absent from this worker's config: another worker's.
                log.warning(
                    "accounts.not_configured_here", usernames=[c.username for c in strangers]
                )
                self._give_back([c.account_id for c in strangers])
                plan.skipped.update(c.account_id for c in strangers)
            for found_claim in found:
                if found_claim.username in plan.by_name:
                    plan.unwritten.add(found_claim.account_id)
                    yield found_claim, plan.by_name[found_claim.username]

    def _release(self, plan: _Plan) -> None:
        """Accounts claimed but not written (a stopped run) go back for others to take now."""
        if plan.unwritten:
            self._give_back(sorted(plan.unwritten))

    def _give_back(self, account_ids: list[int]) -> None:
        try:
            with self._engine.begin() as connection:
                claims.release(connection, account_ids)
        except SQLAlchemyError as exc:  # their leases expire anyway
            log.warning("accounts.release_failed", error=_db_reason(exc))

    def _writer(self) -> Connection:
        """The one connection all of a run's writes go through, one transaction per account.

        Held for the whole run: a connection checked out (and pinged) per account cost more
        than the account's own statements.
        """
        try:
            return self._engine.connect()
        except SQLAlchemyError as exc:
            raise DatabaseError(f"cannot connect for the run: {_db_reason(exc)}") from exc

    def _fetch_all(
        self, run_id: int, targets: Iterator[tuple[claims.Claim, AccountConfig]]
    ) -> Iterator[Attempt]:
        """Fetch and normalize on `api.concurrency` threads, yielding as answers arrive.

        At most two answers per worker are in flight or waiting, so memory does not grow with
        the number of accounts; the caller (the one writer) consumes them in completion order.
        """
        workers = self._config.api.concurrency
        control = self._control
        pending: set[Future[Attempt | None]] = set()
        queue = iter(targets)
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fetch")
        try:
            for claimed, account in itertools.islice(queue, 2 * workers):
                pending.add(pool.submit(self._fetch_one, run_id, claimed, account))
            while pending and control.reason() is None:
                left = control.time_left()
                done, pending = wait(
                    pending,
                    timeout=None if left is None else min(left, 1.0) + 0.01,
                    return_when=FIRST_COMPLETED,
                )
                for future in done:
                    if control.reason() is None:
                        for claimed, account in itertools.islice(queue, 1):
                            pending.add(pool.submit(self._fetch_one, run_id, claimed, account))
                    attempt = future.result()
                    if attempt is not None and control.reason() is None:
                        yield attempt
        finally:
            # Fetches still in flight are abandoned: their answers are never written, so their
            # accounts stay wholly as they were. Their threads end with their request timeout.
            pool.shutdown(wait=control.reason() is None, cancel_futures=True)

    def _fetch_one(
        self, run_id: int, claimed: claims.Claim, account: AccountConfig
    ) -> Attempt | None:
        """Runs on a worker thread: the HTTP fetch and the pure normalizing, never the database.

        None when the run was stopped before this account's request could go out.
        """
        with (
            structlog.contextvars.bound_contextvars(run_id=run_id, username=account.username),
            account_secrets(account.secrets()),
        ):
            started_at, started = self._clock(), time.monotonic()
            try:
                fetched = self._client.fetch(account, self._config.version_of(account))
                snapshot = _normalize(fetched)
            except Stopped:
                return None
            except FetchError as error:
                return Attempt(claimed, account, started_at, started, error=error)
            except Exception as exc:  # a bug must not cost the other accounts their sync
                log.exception("account.internal_error")
                internal = FetchError(ErrorKind.INTERNAL, f"{type(exc).__name__}: {exc}")
                return Attempt(claimed, account, started_at, started, error=internal)
            return Attempt(
                claimed, account, started_at, started, fetched=fetched, snapshot=snapshot
            )

    def _open_run(
        self, targets: Sequence[AccountConfig], as_of: datetime, trigger: str, *, due_only: bool
    ) -> tuple[int, int]:
        """Close dead runs, match `accounts` to the config, open this run; return its id and
        how many accounts it expects to sync (others may take some of the due ones)."""
        specs = [
            runs.AccountSpec(a.username, self._config.version_of(a), a.enabled)
            for a in self._config.accounts
        ]
        with self._engine.begin() as connection:
            liveness.abort_dead(connection, as_of, stale_after_s=self._stale_after_s)
            runs.sync_accounts(connection, specs, as_of)
            expected = claims.count_due(connection, as_of) if due_only else len(targets)
            deadline_s = self._control.deadline_s
            run_id = runs.start_run(
                connection,
                started_at=as_of,
                trigger=trigger,
                total=expected,
                worker_id=self._worker_id,
                deadline_at=None if deadline_s is None else as_of + timedelta(seconds=deadline_s),
            )
        return run_id, expected

    def _store(
        self,
        writer: Connection,
        run_id: int,
        attempt: Attempt,
        as_of: datetime,
        next_due_at: datetime,
        tally: Tally,
    ) -> None:
        """The writer's part for one account: its transaction, its log lines, the tally."""
        account = attempt.account
        account_id = attempt.claim.account_id
        with (
            structlog.contextvars.bound_contextvars(username=account.username),
            account_secrets(account.secrets()),
        ):
            tally.total += 1
            fetched, snapshot, error = attempt.fetched, attempt.snapshot, attempt.error
            changes: list[Change] = []
            if error is None and fetched is not None and snapshot is not None:
                try:
                    changes = self._write(
                        writer,
                        run_id,
                        account_id,
                        fetched,
                        snapshot,
                        as_of,
                        attempt.started_at,
                        next_due_at,
                    )
                except FetchError as storage_error:
                    error = storage_error
            if error is not None or fetched is None or snapshot is None:
                self._record_failure(
                    writer,
                    run_id,
                    account_id,
                    attempt.started_at,
                    error or FetchError(ErrorKind.INTERNAL, "nothing fetched"),
                    next_due_at,
                )
                tally.failed += 1
                return
            tally.succeeded += 1
            tally.changed += bool(changes)
            tally.drift.update(snapshot.unknown_paths)
            if changes:
                log.info("account.changed", changes=[c.as_log() for c in changes])
            log.info(
                "account.synced",
                changed=bool(changes),
                duration_ms=round((time.monotonic() - attempt.started) * 1000),
                attempts=fetched.attempts,
            )

    def _write(
        self,
        writer: Connection,
        run_id: int,
        account_id: int,
        fetched: Fetched,
        snapshot: Snapshot,
        as_of: datetime,
        started_at: datetime,
        next_due_at: datetime,
    ) -> list[Change]:
        """Everything of one account in one transaction: history, events, payload, bookkeeping.

        A body identical to the latest one stored for the account cannot change anything: it
        costs one lookup and the bookkeeping, with no reading of current rows and no diff.
        """
        sha = hashlib.sha256(fetched.body.encode("utf-8")).hexdigest()
        changes: list[Change] = []
        try:
            with writer.begin():
                unchanged = runs.latest_payload_sha(writer, account_id) == sha
                if not unchanged:
                    current = load_current(writer, account_id)
                    changes = diff_rows([item.row for item in current], snapshot.rows())
                    write_history(
                        writer,
                        account_id=account_id,
                        run_id=run_id,
                        as_of=as_of,
                        current=current,
                        fetched=snapshot,
                        changes=changes,
                    )
                    runs.store_payload(
                        writer,
                        account_id=account_id,
                        run_id=run_id,
                        fetched_at=started_at,
                        api_version=fetched.api_version,
                        sha256=sha,
                        body=fetched.body,
                    )
                runs.record_outcome(
                    writer,
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
                    next_due_at=next_due_at,
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
        self,
        writer: Connection,
        run_id: int,
        account_id: int,
        started_at: datetime,
        error: FetchError,
        next_due_at: datetime,
    ) -> None:
        message = current_account_redactor().redact(self._redactor.redact(error.message))
        try:
            with writer.begin():
                runs.record_outcome(
                    writer,
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
                    next_due_at=next_due_at,
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
        self,
        writer: Connection,
        run_id: int,
        tally: Tally,
        started: float,
        *,
        left: int,
        reason: str | None,
    ) -> RunSummary:
        if tally.drift:
            log.warning("schema.drift", paths=sorted(tally.drift))
        counts = tally.counts()
        status = counts.status
        error = None
        if left:
            status = runs.RunStatus.ABORTED
            error = f"{reason or 'stopped'}; {left} accounts left as they were"
            log.warning("run.stopped_early", reason=reason, accounts_left=left)
        try:
            with writer.begin():
                runs.finish_run(
                    writer,
                    run_id,
                    finished_at=self._clock(),
                    counts=counts,
                    status=status,
                    error=error,
                )
        except SQLAlchemyError as exc:
            raise DatabaseError(f"cannot close the run: {_db_reason(exc)}") from exc
        duration_ms = round((time.monotonic() - started) * 1000)
        log.info(
            "run.finished",
            status=str(status),
            total=counts.total,
            succeeded=counts.succeeded,
            failed=counts.failed,
            changed=counts.changed,
            duration_ms=duration_ms,
        )
        return RunSummary(run_id, status, counts, duration_ms)


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
