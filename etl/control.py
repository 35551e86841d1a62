"""How a run is told to end early: a stop (a signal) or a deadline, whichever comes first.

Checking the deadline between claims and fetches is not enough: a statement waiting on a lock,
or on a server that died, never comes back to check. `DatabaseWatchdog` makes the end reach the
database: once the deadline passes, or a stop has waited `stop_grace_s` for writes in flight to
commit, it cancels the run's statements still going, so the run can close itself `aborted`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Protocol

import structlog

log = structlog.get_logger("etl.control")

# A stop waits for the run at most this long (or the request timeout if longer): half of it for
# writes in flight to commit, the other half for the run to close once they are cancelled.
MIN_SHUTDOWN_S = 30.0
# Once a run is cut, its statements are cancelled again this often while it has not ended (one
# started after the cut, such as a last batch written, would wait on the same lock)...
RECANCEL_S = 1.0
# ...but a connection taken after the cut (closing the run) first gets this long to finish.
CLEANUP_S = 5.0
POLL_S = 0.1


class RunControl:
    """Shared by everything a run does: the claimer, the fetchers, the client's waits.

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


def shutdown_bound_s(request_timeout_s: float) -> float:
    """How long a stopped run may take to end: 30 s, or the request timeout if longer."""
    return max(MIN_SHUTDOWN_S, request_timeout_s)


class Cancel(Protocol):
    """Cancels the statements of the run's connections checked out before a monotonic time;
    returns how many connections were told (`etl.db.RunConnections.cancel`)."""

    def __call__(self, *, checked_out_before: float) -> int: ...


class DatabaseWatchdog:
    """A thread, for the length of a run, that cancels its statements once the run is cut.

    The cut is the deadline, or the stop plus `stop_grace_s`. Connections checked out before
    the cut are cancelled then and every `RECANCEL_S` until the run ends; the ones checked out
    after it (releasing the accounts, closing the run) only once they are `CLEANUP_S` old.
    Cancelling an idle connection does nothing, so a cut that found nothing stuck costs nothing.
    """

    def __init__(
        self,
        control: RunControl,
        cancel: Cancel,
        *,
        stop_grace_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._control = control
        self._cancel = cancel
        self._stop_grace_s = stop_grace_s
        self._clock = clock
        self._done = threading.Event()
        self._stopped_at: float | None = None
        self._thread = threading.Thread(target=self._watch, name="db-watchdog", daemon=True)

    def __enter__(self) -> DatabaseWatchdog:
        self._thread.start()
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self._done.set()
        # Not joined: a cancel request to a server that is gone may take CANCEL_TIMEOUT_S, and
        # the thread is a daemon; it does nothing more once `_done` is set.

    def _watch(self) -> None:
        cut: float | None = None
        last = float("-inf")
        logged = False
        while not self._done.wait(POLL_S):
            now = self._clock()
            cut = cut if cut is not None else self._cut(now)
            if cut is None or now - last < RECANCEL_S:
                continue
            last = now
            told = self._cancel(checked_out_before=max(cut, now - CLEANUP_S))
            if told and not logged and not self._done.is_set():
                logged = True
                log.warning(
                    "run.cancelling_statements", reason=self._control.reason(), connections=told
                )

    def _cut(self, now: float) -> float | None:
        """When the run was cut (a monotonic time), or None while it may go on."""
        deadline = self._control.deadline
        if deadline is not None and now >= deadline:
            return deadline
        if not self._control.stop.is_set():
            return None
        if self._stopped_at is None:
            self._stopped_at = now
        return self._stopped_at if now >= self._stopped_at + self._stop_grace_s else None
