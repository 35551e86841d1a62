"""How a run is told to end early: a stop (a signal) or a deadline, whichever comes first."""

from __future__ import annotations

import threading
import time


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
