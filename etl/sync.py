"""One sync run: claim the due accounts, fetch them, and write them in atomic batches.

The pipeline takes its seams as arguments (an engine, a client, a clock) and owns the order of
things: bookkeeping first; then accounts claimed in batches (`etl.claims`), fetched concurrently
(`etl.fetch`, or `etl.fetchprocs` on several cores), and written in batches by one writer
(`etl.writer`), each account whole or not at all; then the run's closing line. The clock is read
once per run: that `as_of` becomes every new row's valid_from.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import structlog
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from etl import claims, liveness, runs
from etl.client import TraktClient
from etl.config import AccountConfig, Config
from etl.control import RunControl
from etl.errors import DatabaseError, UsageError
from etl.fetch import Clock, Fetcher, FetchResult, FetchTask, ThreadFetcher
from etl.fetchprocs import ProcessFetcher, processes_for
from etl.logs import current_settings
from etl.redact import Redactor, account_secrets
from etl.writer import BackgroundWriter, BatchWriter, Written, reason

__all__ = ["RunControl", "RunSummary", "Syncer", "select_accounts", "utc_now"]

log = structlog.get_logger("etl.sync")

# A batch is written when it has this many accounts, or its oldest waited this long.
WRITE_BATCH = 200
FLUSH_S = 0.25


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class _Plan:
    """What one run syncs, and what it has claimed but not yet written."""

    by_name: dict[str, AccountConfig]
    only: list[str] | None
    due_only: bool
    as_of: datetime
    next_due_at: datetime
    unwritten: set[int] = field(default_factory=set)


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

        A stop or a deadline (`RunControl`) ends the run early: what was fetched by then is
        written, fetches in flight are abandoned (those accounts stay wholly as they were), and
        the run is closed `aborted`.
        """
        targets = select_accounts(self._config, only)
        scheduled = trigger == "schedule"
        as_of = self._clock()
        started = time.monotonic()
        try:
            run_id, expected = self._open_run(targets, as_of, trigger, due_only=scheduled)
        except SQLAlchemyError as exc:
            raise DatabaseError(f"cannot start the run: {reason(exc)}") from exc
        plan = _Plan(
            by_name={a.username: a for a in targets},
            only=None if not only else list(dict.fromkeys(only)),
            due_only=scheduled,
            as_of=as_of,
            next_due_at=claims.next_window(as_of, self._config.schedule.period_s()),
        )
        with structlog.contextvars.bound_contextvars(run_id=run_id):
            log.info("run.started", accounts=expected, trigger=trigger)
            tally = Tally()
            try:
                self._fetch_and_write(run_id, expected, plan, tally)
            except DatabaseError as exc:
                # Past its deadline or stop, the run's stuck statements are cancelled
                # (etl.control.DatabaseWatchdog): the run ends early, it is closed below.
                if self._control.reason() is None:
                    raise
                log.warning("run.write_cancelled", error=str(exc))
            left = len(plan.unwritten)
            stopped = self._control.reason()
            self._release(plan)
            return self._close_run(run_id, tally, started, left=left, why=stopped)

    def _fetcher(self, run_id: int, accounts: int) -> Fetcher:
        """Threads here, or fetch processes for a big, fast run (`api.fetch_processes`).

        Fetch processes make clients of their own from `api`; the client given to the Syncer
        serves the threads.
        """
        api = self._config.api
        processes = processes_for(api, accounts, os.cpu_count() or 1)
        if processes:
            return ProcessFetcher(
                api, processes=processes, run_id=run_id, logging=current_settings()
            )
        return ThreadFetcher(
            self._client, concurrency=api.concurrency, run_id=run_id, clock=self._clock
        )

    def _fetch_and_write(self, run_id: int, accounts: int, plan: _Plan, tally: Tally) -> None:
        """Results go to the writer's thread in batches: full ones, or whatever waited
        `FLUSH_S`; fetching goes on while a batch commits."""

        @contextmanager
        def open_writer() -> Iterator[BatchWriter]:
            with self._writer_connection() as connection:
                yield BatchWriter(
                    connection,
                    run_id=run_id,
                    as_of=plan.as_of,
                    next_due_at=plan.next_due_at,
                    clock=self._clock,
                    redact=self._redactor.redact,
                )

        def on_written(written: Written) -> None:
            plan.unwritten.discard(written.result.account_id)
            self._report(written, plan.by_name[written.result.username], tally)

        fetcher = self._fetcher(run_id, accounts)
        writer = BackgroundWriter(open_writer, on_written)
        try:
            batch: list[FetchResult] = []
            oldest = 0.0
            for result in fetcher.results(self._tasks(plan), self._control, FLUSH_S):
                if writer.failed:
                    break
                if result is not None:
                    if not batch:
                        oldest = time.monotonic()
                    batch.append(result)
                if batch and (
                    result is None
                    or len(batch) >= WRITE_BATCH
                    or time.monotonic() - oldest >= FLUSH_S
                ):
                    writer.submit(batch)
                    batch = []
            if batch and not writer.failed:
                writer.submit(batch)
        finally:
            fetcher.close()
            writer.close()

    def _report(self, written: Written, account: AccountConfig, tally: Tally) -> None:
        """The committed account's log lines and its part of the tally."""
        result = written.result
        with (
            structlog.contextvars.bound_contextvars(username=result.username),
            account_secrets(account.secrets()),
        ):
            tally.total += 1
            error = written.error
            if error is not None:
                tally.failed += 1
                log.warning(
                    "account.failed",
                    error_kind=str(error.kind),
                    error=self._redactor.redact(error.message),
                    http_status=error.http_status,
                    attempts=error.attempts,
                )
                return
            tally.succeeded += 1
            tally.changed += bool(written.changes)
            tally.drift.update(result.unknown_paths)  # an unchanged body's come from the claim
            if written.changes:
                log.info("account.changed", changes=[c.as_log() for c in written.changes])
            log.info(
                "account.synced",
                changed=bool(written.changes),
                duration_ms=round(result.elapsed_s * 1000),
                attempts=result.attempts,
            )

    def _tasks(self, plan: _Plan) -> Iterator[FetchTask]:
        """Accounts this worker may sync now, leased to it in small batches as it goes.

        A scheduled run takes the due ones; a manual run every selected account it has not
        synced yet (last attempted before the run began). Accounts another worker holds are
        skipped: they are being synced already. The table is walked once in id order, then once
        more from the start for accounts freed meanwhile (a stopped worker gave them back).
        """
        # A few times what this worker fetches at once: claims cost a couple of statements
        # each, but what a worker has claimed, the others cannot share.
        batch = min(500, max(50, 8 * self._config.api.concurrency))
        after, swept = 0, False
        while self._control.reason() is None:
            found = self._claim(plan, batch, after)
            if not found:
                if after == 0 or swept:
                    return
                after, swept = 0, True
                continue
            after = found[-1].account_id
            strangers = [c for c in found if c.username not in plan.by_name]
            if strangers:
                # Enabled in the database, absent from this worker's config: another worker's.
                log.warning(
                    "accounts.not_configured_here", usernames=[c.username for c in strangers]
                )
                self._give_back([c.account_id for c in strangers])
            for claimed in found:
                account = plan.by_name.get(claimed.username)
                if account is not None:
                    plan.unwritten.add(claimed.account_id)
                    yield FetchTask(
                        claimed.account_id,
                        account,
                        self._config.version_of(account),
                        claimed.payload_sha256,
                        claimed.unknown_paths,
                    )

    def _claim(self, plan: _Plan, limit: int, after: int) -> list[claims.Claim]:
        try:
            with self._engine.begin() as connection:
                return claims.claim(
                    connection,
                    worker_id=self._worker_id,
                    now=self._clock(),
                    lease_s=self._stale_after_s,
                    limit=limit,
                    only=plan.only,
                    due_at=plan.as_of if plan.due_only else None,
                    attempted_before=None if plan.due_only else plan.as_of,
                    after_id=after,
                )
        except SQLAlchemyError as exc:
            raise DatabaseError(f"cannot claim accounts: {reason(exc)}") from exc

    def _release(self, plan: _Plan) -> None:
        """Accounts claimed but not written (a stopped run) go back for others to take now."""
        if plan.unwritten:
            self._give_back(sorted(plan.unwritten))

    def _give_back(self, account_ids: list[int]) -> None:
        try:
            with self._engine.begin() as connection:
                claims.release(connection, account_ids)
        except SQLAlchemyError as exc:  # their leases expire anyway
            log.warning("accounts.release_failed", error=reason(exc))

    def _writer_connection(self) -> Connection:
        """The one connection all of a run's writes go through, one transaction per batch."""
        try:
            return self._engine.connect()
        except SQLAlchemyError as exc:
            raise DatabaseError(f"cannot connect for the run: {reason(exc)}") from exc

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
                host=liveness.HOST,
                worker_id=self._worker_id,
                deadline_at=None if deadline_s is None else as_of + timedelta(seconds=deadline_s),
            )
        return run_id, expected

    def _close_run(
        self,
        run_id: int,
        tally: Tally,
        started: float,
        *,
        left: int,
        why: str | None,
    ) -> RunSummary:
        if tally.drift:
            log.warning("schema.drift", paths=sorted(tally.drift))
        counts = tally.counts()
        status = counts.status
        error = None
        if left:
            status = runs.RunStatus.ABORTED
            error = f"{why or 'stopped'}; {left} accounts left as they were"
            log.warning("run.stopped_early", reason=why, accounts_left=left)
        try:
            with self._engine.begin() as connection:
                runs.finish_run(
                    connection,
                    run_id,
                    finished_at=self._clock(),
                    counts=counts,
                    status=status,
                    error=error,
                )
        except SQLAlchemyError as exc:
            raise DatabaseError(f"cannot close the run: {reason(exc)}") from exc
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
