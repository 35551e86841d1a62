"""The exception hierarchy of trakt-etl.

Every error the program means to report derives from `TraktEtlError`. Third-party exceptions are
translated into these at the seam where they happen (``raise ... from exc``); the CLI is the one
place that turns them into messages and exit codes (`exit_code_for`).
"""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import Any


class ExitCode(IntEnum):
    OK = 0
    ACCOUNTS_FAILED = 1
    USAGE = 2
    DATABASE = 3


class ErrorKind(StrEnum):
    """Why one account failed; stored in `account_syncs.error_kind` (CONTRACT.md, guarantee 7)."""

    AUTH = "auth"
    RATE_LIMITED = "rate_limited"
    HTTP = "http"
    TIMEOUT = "timeout"
    CONNECTION = "connection"
    INVALID_RESPONSE = "invalid_response"
    API_FAILURE = "api_failure"
    TOO_LARGE = "too_large"
    # Beyond the contract's list: not a bad response, but still one account failing alone.
    STORAGE = "storage"  # the database refused this account's data (PostgreSQL and a NUL byte)
    INTERNAL = "internal"  # a bug in trakt-etl; the log has the traceback


class TraktEtlError(Exception):
    """Root of every error trakt-etl reports on purpose."""

    exit_code: ExitCode = ExitCode.ACCOUNTS_FAILED


class ConfigError(TraktEtlError):
    """The configuration is wrong; `path` names the key (``accounts[2].password``)."""

    exit_code = ExitCode.USAGE

    def __init__(self, message: str, path: str | None = None) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class UsageError(TraktEtlError):
    """The command line asks for something impossible (an unknown --account, say)."""

    exit_code = ExitCode.USAGE


class DatabaseError(TraktEtlError):
    """The database cannot be reached, or its schema cannot be brought up to date."""

    exit_code = ExitCode.DATABASE


class ConcurrentRunError(DatabaseError):
    """Another sync already holds the database (SQLite allows one writer process)."""


class FetchError(TraktEtlError):
    """One account's settings could not be fetched or understood.

    It fails that account alone; the run goes on with the others.
    """

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        http_status: int | None = None,
        attempts: int = 1,
        retry_after: float | None = None,
    ) -> None:
        self.kind = kind
        self.message = message
        self.http_status = http_status
        self.attempts = attempts
        self.retry_after = retry_after  # seconds the server asked us to wait, if it did
        super().__init__(f"{kind}: {message}")

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"

    def __reduce__(self) -> tuple[Any, ...]:
        # Fetch processes send their errors to the writer pickled; the default would call
        # FetchError(str(self)) and lose the kind.
        return (
            _rebuild_fetch_error,
            (self.kind, self.message, self.http_status, self.attempts, self.retry_after),
        )


def _rebuild_fetch_error(
    kind: ErrorKind,
    message: str,
    http_status: int | None,
    attempts: int,
    retry_after: float | None,
) -> FetchError:
    return FetchError(
        kind, message, http_status=http_status, attempts=attempts, retry_after=retry_after
    )


class Stopped(TraktEtlError):
    """The run was told to stop (a signal, a deadline) before this piece of work began."""


class InvalidPayloadError(TraktEtlError):
    """A payload's shape or types are wrong; `path` names the field (``profile.age``)."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


def exit_code_for(error: BaseException) -> ExitCode:
    """The process exit status for an error that reached the top of a command."""
    if isinstance(error, TraktEtlError):
        return error.exit_code
    return ExitCode.ACCOUNTS_FAILED
