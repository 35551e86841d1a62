"""Pacing requests to the trakt API: a client-side rate limit shared by all workers, and pauses
the server asks for (a 429's Retry-After, a rate-limit budget reported as spent).

The limit itself is pyrate-limiter's: at most `limit` requests in any window of `interval`
(`rate_for`). For ``max_requests_per_s: 20`` that is 2 requests per 110 ms: the documented burst
is a tenth of the rate, and the pace is 10% under the limit, which leaves room for network
jitter so that the server never counts more than 20 in a second. Reading the server's
rate-limit headers is a pure function (`server_pause`).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from pyrate_limiter import Limiter, Rate

_BUCKET = "trakt-api"


# Requests leave here on time but reach the server with some jitter (threads, new connections),
# which can squeeze two windows' worth into one of the server's seconds. Widening our window by
# this share keeps the server's own count within the limit.
JITTER_MARGIN = 0.1


# Requests are spread over the second in slices of this length rather than sent as one burst:
# a burst's stragglers (a new connection, a busy thread) would land in the server's next second.
SLICE_S = 0.1


def rate_for(per_second: float) -> Rate:
    """`per_second` as whole requests per short, slightly widened interval.

    20/s → 2 per 110 ms; 3/s → 1 per 367 ms; 10,000/s → 1,000 per 110 ms.
    """
    if per_second <= 0:
        raise ValueError("the rate must be positive")
    limit = max(1, round(per_second * SLICE_S))
    return Rate(limit, max(1, round(limit / per_second * 1000 * (1 + JITTER_MARGIN))))


class RequestGate:
    """Every request waits here for its turn; thread-safe, shared by all fetch workers."""

    def __init__(
        self,
        per_second: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        stop: threading.Event | None = None,
        on_pause: Callable[[float], None] | None = None,
    ) -> None:
        self.rate = rate_for(per_second)
        self._limiter = Limiter(self.rate)
        self._clock = clock
        self._stop = stop or threading.Event()
        self._lock = threading.Lock()
        self._resume_at = 0.0
        # Told of every pause the server asks for (with its end on `clock`), so that gates in
        # other fetch processes can hold their requests too.
        self._on_pause = on_pause

    def wait_turn(self) -> bool:
        """Block until a request may go out; False if the gate was stopped meanwhile."""
        while True:
            with self._lock:
                delay = self._resume_at - self._clock()
            if delay <= 0:
                break
            if self._stop.wait(delay):
                return False
        if self._stop.is_set():
            return False
        self._limiter.try_acquire(_BUCKET, blocking=True)
        return not self._stop.is_set()

    def pause_for(self, seconds: float) -> None:
        """Hold every request for `seconds` (the server said the budget is spent)."""
        until = self._clock() + seconds
        self.pause_until(until)
        if self._on_pause is not None:
            self._on_pause(until)

    def pause_until(self, moment: float) -> None:
        """Hold every request until `moment` on the gate's clock (another gate was told to)."""
        with self._lock:
            self._resume_at = max(self._resume_at, moment)

    def stop(self) -> None:
        self._stop.set()


def _seconds_until(value: str, now: datetime) -> float | None:
    """A delay given as seconds, a unix time, an HTTP date or an ISO-8601 time."""
    value = value.strip()
    try:
        number = float(value)
    except ValueError:
        number = None
    if number is not None:
        # Large numbers are absolute unix times (X-RateLimit-Reset), small ones are seconds.
        return number - now.timestamp() if number > 1e9 else number
    for parse in (parsedate_to_datetime, datetime.fromisoformat):
        try:
            moment = parse(
                value.replace("Z", "+00:00") if parse is datetime.fromisoformat else value
            )
        except (TypeError, ValueError, IndexError):
            continue
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return (moment - now).total_seconds()
    return None


def server_pause(headers: Mapping[str, str], now: datetime) -> float | None:
    """How long the server asks us to wait, from its headers; None if it does not say.

    Understood: ``Retry-After`` (seconds or HTTP date), ``X-RateLimit-Remaining: 0`` with
    ``X-RateLimit-Reset`` (seconds or unix time), and trakt's ``X-Ratelimit`` JSON
    (``{"remaining": 0, "until": "2026-...Z"}``).
    """
    lowered = {key.lower(): value for key, value in headers.items()}
    waits: list[float] = []
    if "retry-after" in lowered:
        wait = _seconds_until(lowered["retry-after"], now)
        if wait is not None:
            waits.append(wait)
    if lowered.get("x-ratelimit-remaining", "").strip() == "0" and "x-ratelimit-reset" in lowered:
        wait = _seconds_until(lowered["x-ratelimit-reset"], now)
        if wait is not None:
            waits.append(wait)
    trakt = lowered.get("x-ratelimit", "")
    if trakt.startswith("{"):
        try:
            budget = json.loads(trakt)
        except ValueError:
            budget = None
        if isinstance(budget, dict) and budget.get("remaining") == 0 and budget.get("until"):
            wait = _seconds_until(str(budget["until"]), now)
            if wait is not None:
                waits.append(wait)
    return max(0.0, max(waits)) if waits else None
