"""Fetching accounts: one account's task and result, and fetching many at once on threads.

`fetch_account` is all of one account's fetch: the HTTP answer (through `TraktClient`),
normalized when it is new, reduced to a `FetchResult` that the writer can store. It never touches
the database, so it runs anywhere: on a thread of this process (`ThreadFetcher`), or in fetch
processes of their own (`etl.fetchprocs`), which is how a sync uses more than one core.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import structlog

from etl.client import Fetched, TraktClient, adapter_for
from etl.config import AccountConfig
from etl.control import RunControl
from etl.errors import ErrorKind, FetchError, InvalidPayloadError, Stopped
from etl.records import Snapshot
from etl.redact import account_secrets, current_account_redactor

log = structlog.get_logger("etl.fetch")

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class FetchTask:
    """One account to fetch, with the SHA-256 of the body stored for it last time and that
    body's unknown paths (an unchanged answer is not decoded: these are its paths)."""

    account_id: int
    account: AccountConfig
    api_version: int
    known_sha256: str | None = None
    known_unknown_paths: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class FetchResult:
    """How one account's fetch ended: new settings, the same body as before, or a failure."""

    account_id: int
    username: str
    started_at: datetime
    finished_at: datetime
    elapsed_s: float
    api_version: int
    attempts: int
    http_status: int | None
    sha256: str | None = None
    body: str | None = None  # only for a new body
    snapshot: Snapshot | None = None  # only for a new body
    error: FetchError | None = None
    # Fields the normalizer does not know: the new body's, or the stored one's when unchanged.
    unknown_paths: tuple[str, ...] = ()

    @property
    def unchanged(self) -> bool:
        """The body is byte for byte the one stored last: nothing to write but bookkeeping."""
        return self.error is None and self.snapshot is None


def fetch_account(
    client: TraktClient, task: FetchTask, run_id: int, clock: Clock = utc_now
) -> FetchResult | None:
    """Fetch and normalize one account; None when the run stopped before its request went out.

    A bug (any other exception) fails this account as `internal`, not the run.
    """
    account = task.account
    with (
        structlog.contextvars.bound_contextvars(run_id=run_id, username=account.username),
        account_secrets(account.secrets()),
    ):
        started_at, started = clock(), time.monotonic()

        def ended(**outcome: object) -> FetchResult:
            return FetchResult(
                account_id=task.account_id,
                username=account.username,
                started_at=started_at,
                finished_at=clock(),
                elapsed_s=time.monotonic() - started,
                api_version=task.api_version,
                **outcome,  # type: ignore[arg-type]
            )

        try:
            fetched = client.fetch(account, task.api_version, task.known_sha256)
            snapshot = None if fetched.unchanged else normalize(fetched)
        except Stopped:
            return None
        except FetchError as failed:
            return ended(attempts=failed.attempts, http_status=failed.http_status, error=failed)
        except Exception as exc:  # a bug must not cost the other accounts their sync
            log.exception("account.internal_error")
            message = current_account_redactor().redact(f"{type(exc).__name__}: {exc}")
            internal = FetchError(ErrorKind.INTERNAL, message)
            return ended(attempts=1, http_status=None, error=internal)
        return ended(
            attempts=fetched.attempts,
            http_status=fetched.http_status,
            sha256=fetched.sha256,
            body=fetched.body,
            snapshot=snapshot,
            unknown_paths=task.known_unknown_paths if snapshot is None else snapshot.unknown_paths,
        )


def normalize(fetched: Fetched) -> Snapshot:
    """The answer's rows; a payload the normalizer refuses is an invalid response."""
    assert fetched.payload is not None
    try:
        return adapter_for(fetched.api_version).normalize(fetched.payload)
    except InvalidPayloadError as exc:
        raise FetchError(
            ErrorKind.INVALID_RESPONSE,
            str(exc),
            http_status=fetched.http_status,
            attempts=fetched.attempts,
        ) from exc


class Fetcher(Protocol):
    """Fetches a stream of tasks, yielding results as they complete.

    None is yielded when nothing completed for `tick_s`, so the caller can do its own work
    (flush a batch) while fetches are slow. When the run is stopped, fetches in flight are
    abandoned: their results are never yielded, and their accounts stay as they were.
    """

    def results(
        self, tasks: Iterator[FetchTask], control: RunControl, tick_s: float
    ) -> Iterator[FetchResult | None]: ...

    def close(self) -> None: ...


class ThreadFetcher:
    """`concurrency` fetches at once on threads of this process (one core at most: the GIL).

    At most two tasks per thread are in flight or waiting, so memory does not grow with the
    number of accounts.
    """

    def __init__(
        self, client: TraktClient, *, concurrency: int, run_id: int, clock: Clock = utc_now
    ) -> None:
        self._client = client
        self._concurrency = concurrency
        self._run_id = run_id
        self._clock = clock

    def results(
        self, tasks: Iterator[FetchTask], control: RunControl, tick_s: float
    ) -> Iterator[FetchResult | None]:
        workers = self._concurrency
        pending: set[Future[FetchResult | None]] = set()
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fetch")

        def submit(count: int) -> None:
            for task in itertools.islice(tasks, count):
                pending.add(
                    pool.submit(fetch_account, self._client, task, self._run_id, self._clock)
                )

        try:
            submit(2 * workers)
            while pending and control.reason() is None:
                left = control.time_left()
                done, pending = wait(
                    pending,
                    timeout=tick_s if left is None else min(left + 0.01, tick_s),
                    return_when=FIRST_COMPLETED,
                )
                if not done:
                    yield None
                    continue
                if control.reason() is None:
                    submit(len(done))
                for future in done:
                    result = future.result()
                    if result is not None and control.reason() is None:
                        yield result
        finally:
            # Fetches still in flight are abandoned: their answers are never written, so their
            # accounts stay wholly as they were. Their threads end with their request timeout.
            pool.shutdown(wait=control.reason() is None, cancel_futures=True)

    def close(self) -> None:
        """Nothing of its own to release: the client belongs to the caller."""
