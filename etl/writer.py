"""Writing fetched accounts: many accounts a transaction, each of them whole or not at all.

A batch of fetch results is written in one transaction: every account's bookkeeping
(`account_syncs`, `accounts`) and, for the accounts whose body is new, the raw payload, the
history rows and the change events. The statements are per batch, not per account: the current
rows of the whole batch are read at once, and closes and inserts go in one statement per table.
A batch commits or rolls back whole, so each account in it is wholly old or wholly new
(CONTRACT guarantee 4), and a crash loses at most the batch in flight.

When the database refuses a batch because of one account's data (PostgreSQL cannot store a NUL
character, say), the batch is written again one account at a time, and only that account fails,
with error kind `storage`. A lost connection is not an account's fault: it ends the run.

`BackgroundWriter` runs a `BatchWriter` on a thread of its own, so that fetching goes on while a
batch commits: the fetch processes would otherwise sit idle for every commit.
"""

from __future__ import annotations

import contextvars
import queue
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError

from etl import history, runs
from etl.diff import diff_rows
from etl.errors import DatabaseError, ErrorKind, FetchError
from etl.fetch import FetchResult
from etl.records import Change

Clock = Callable[[], datetime]


@dataclass(frozen=True, slots=True)
class Written:
    """One account as committed: what changed, or why it failed (the fetch's or the write's)."""

    result: FetchResult
    changes: Sequence[Change] = ()
    error: FetchError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class BatchWriter:
    """Writes batches of results of one run through one connection (the run's only writer)."""

    def __init__(
        self,
        connection: Connection,
        *,
        run_id: int,
        as_of: datetime,
        next_due_at: datetime | None,
        clock: Clock,
        redact: Callable[[str], str] = lambda text: text,
    ) -> None:
        self._connection = connection
        self._run_id = run_id
        self._as_of = as_of
        self._next_due_at = next_due_at
        self._clock = clock
        self._redact = redact

    def write(self, results: Sequence[FetchResult]) -> list[Written]:
        """Commit `results`; what each account ended as. Raises `DatabaseError` if the
        database is gone (nothing of the batch is then committed)."""
        if not results:
            return []
        try:
            with self._connection.begin():
                return self._write_batch(results)
        except DBAPIError as exc:
            if _lost(exc):
                raise DatabaseError(f"database lost during the run: {reason(exc)}") from exc
            if len(results) == 1:
                return [self._refused(results[0], exc)]
        # One account's data was refused: find which, by writing them one at a time.
        written: list[Written] = []
        for result in results:
            written += self.write([result])
        return written

    def _write_batch(self, results: Sequence[FetchResult]) -> list[Written]:
        connection = self._connection
        new = [r for r in results if r.error is None and r.snapshot is not None]
        current = history.load_current(connection, [r.account_id for r in new])
        batch: list[history.AccountChanges] = []
        changes_of: dict[int, list[Change]] = {}
        for result in new:
            assert result.snapshot is not None
            stored = current[result.account_id]
            changes = diff_rows([item.row for item in stored], result.snapshot.rows())
            changes_of[result.account_id] = changes
            batch.append(
                history.AccountChanges(result.account_id, stored, result.snapshot, changes)
            )
        history.write_history(connection, run_id=self._run_id, as_of=self._as_of, accounts=batch)
        runs.store_payloads(
            connection,
            self._run_id,
            [
                runs.StoredPayload(
                    account_id=r.account_id,
                    fetched_at=r.started_at,
                    api_version=r.api_version,
                    sha256=r.sha256 or "",
                    body=r.body or "",
                    unknown_paths=r.unknown_paths,
                )
                for r in new
            ],
        )
        written = [
            Written(r, changes_of.get(r.account_id, ()), r.error) for r in results
        ]
        runs.record_outcomes(
            connection,
            self._run_id,
            [self._outcome(w) for w in written],
            now=self._clock(),
            next_due_at=self._next_due_at,
        )
        return written

    def _refused(self, result: FetchResult, exc: SQLAlchemyError) -> Written:
        """The database refused this account's data: record it failed, in a transaction of its
        own (its history is untouched)."""
        error = FetchError(
            ErrorKind.STORAGE,
            f"the database refused the data: {reason(exc)}",
            http_status=result.http_status,
            attempts=result.attempts,
        )
        written = Written(result, (), error)
        try:
            with self._connection.begin():
                runs.record_outcomes(
                    self._connection,
                    self._run_id,
                    [self._outcome(written)],
                    now=self._clock(),
                    next_due_at=self._next_due_at,
                )
        except SQLAlchemyError as again:
            raise DatabaseError(f"cannot record a failed account: {reason(again)}") from again
        return written

    def _outcome(self, written: Written) -> runs.AccountOutcome:
        result, error = written.result, written.error
        return runs.AccountOutcome(
            account_id=result.account_id,
            started_at=result.started_at,
            finished_at=result.finished_at,
            ok=error is None,
            changed=bool(written.changes),
            http_status=error.http_status if error else result.http_status,
            error_kind=str(error.kind) if error else None,
            error_message=self._redact(error.message) if error else None,
            attempts=error.attempts if error else result.attempts,
        )


def reason(exc: SQLAlchemyError) -> str:
    """The database's own first line about what went wrong."""
    original: Any = getattr(exc, "orig", None) or exc
    text = str(original).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _lost(exc: DBAPIError) -> bool:
    """The connection is gone (not a refusal of this data, nor a lock to wait out)."""
    if exc.connection_invalidated:
        return True
    locked = "locked" in str(exc.orig).lower()
    return isinstance(exc, (OperationalError, InterfaceError)) and not locked


class BackgroundWriter:
    """Writes batches on a thread of its own, reporting each account as it commits.

    At most `depth` batches wait for the thread; `submit` blocks beyond that, so memory stays
    flat. The thread opens and owns the writer (and its connection). If writing fails (the
    database is gone), the thread stops, and the error is raised by `submit` or `close`.
    """

    def __init__(
        self,
        open_writer: Callable[[], AbstractContextManager[BatchWriter]],
        on_written: Callable[[Written], None],
        *,
        depth: int = 2,
    ) -> None:
        self._open_writer = open_writer
        self._on_written = on_written
        self._batches: queue.Queue[Sequence[FetchResult] | None] = queue.Queue(maxsize=depth)
        self._failure: BaseException | None = None
        # The thread logs with this thread's context (the run id).
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._work,), name="writer")
        self._thread.start()

    def submit(self, batch: Sequence[FetchResult]) -> None:
        """Queue a batch; raises the writer's failure instead if it has stopped."""
        while self._failure is None:
            try:
                self._batches.put(batch, timeout=0.2)
                return
            except queue.Full:
                continue
        raise self._failure

    @property
    def failed(self) -> bool:
        return self._failure is not None

    def close(self) -> None:
        """Write what is queued, end the thread, raise its failure if it had one."""
        while self._thread.is_alive():
            try:
                self._batches.put(None, timeout=0.2)
                break
            except queue.Full:
                continue
        self._thread.join()
        if self._failure is not None:
            raise self._failure

    def _work(self) -> None:
        try:
            with self._open_writer() as writer:
                while (batch := self._batches.get()) is not None:
                    for written in writer.write(batch):
                        self._on_written(written)
        except BaseException as exc:  # raised again in the thread that submits
            self._failure = exc

