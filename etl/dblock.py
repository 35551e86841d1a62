"""One process at a time on a SQLite file: an advisory lock beside the database.

SQLite has one writer and no row locks to share work by, so a second `sync` or `daemon` against
the same file is refused at once with a message naming the holder (or waits, with --wait). The
lock is `flock` on `<database>.lock`: the kernel releases it when its process dies, kill -9
included, so a crashed process never leaves the database locked. Other databases need no lock
here: PostgreSQL and MariaDB share the work through row leases (`etl.claims`).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from sqlalchemy import Engine

from etl.errors import ConcurrentRunError


def lock_path_for(engine: Engine) -> Path | None:
    """Where the lock of this engine's database lives; None when no lock is needed."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or database in (None, "", ":memory:"):
        return None
    return Path(f"{database}.lock")


class ProcessLock:
    """Held for the life of a `sync` or `daemon` process on a SQLite database."""

    def __init__(self, path: Path | None, *, wait: bool = False) -> None:
        self._path = path
        self._wait = wait
        self._fd: int | None = None

    def acquire(self) -> None:
        if self._path is None:
            return
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if self._wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise ConcurrentRunError(
                f"another trakt-etl process (pid {holder}) is using {self._path.with_suffix('')}; "
                "SQLite allows one at a time: wait for it, or give --wait to queue behind it"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode("ascii"), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None

    def __enter__(self) -> ProcessLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()
