"""The request pacing: rates as pyrate-limiter sees them, server pause headers, the shared gate."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from etl.ratelimit import RequestGate, rate_for, server_pause

NOW = datetime(2026, 12, 3, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("per_second", "limit", "interval_ms"),
    [(3, 1, 367), (20, 2, 110), (0.5, 1, 2200), (2.5, 1, 440), (10_000, 1000, 110)],
)
def test_rate_for__keeps_the_configured_pace(
    per_second: float, limit: int, interval_ms: int
) -> None:
    """A rate becomes a small burst per short interval, paced 10% under the limit."""
    rate = rate_for(per_second)
    assert (rate.limit, rate.interval) == (limit, interval_ms)


def test_rate_for__refuses_a_non_positive_rate() -> None:
    """Zero requests per second is not a rate."""
    with pytest.raises(ValueError, match="positive"):
        rate_for(0)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "7"}, 7.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"Retry-After": format_datetime(NOW + timedelta(seconds=30), usegmt=True)}, 30.0),
        ({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "12"}, 12.0),
        (
            {
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": str(int((NOW + timedelta(seconds=40)).timestamp())),
            },
            40.0,
        ),
        ({"X-Ratelimit": '{"remaining": 0, "until": "2026-12-03T12:01:00Z"}'}, 60.0),
        ({"Retry-After": "5", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "9"}, 9.0),
        ({"Retry-After": "-3"}, 0.0),
    ],
)
def test_server_pause__reads_the_rate_limit_headers(
    headers: dict[str, str], expected: float
) -> None:
    """Retry-After, X-RateLimit-* and trakt's X-Ratelimit all say how long to wait."""
    assert server_pause(headers, NOW) == pytest.approx(expected)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-RateLimit-Remaining": "12", "X-RateLimit-Reset": "30"},
        {"X-Ratelimit": '{"remaining": 5, "until": "2026-12-03T12:01:00Z"}'},
        {"X-Ratelimit": "{not json"},
        {"Retry-After": "soon"},
    ],
)
def test_server_pause__none_when_the_budget_is_not_spent(headers: dict[str, str]) -> None:
    """Headers that do not ask for a pause (or cannot be read) give no pause."""
    assert server_pause(headers, NOW) is None


def test_gate__pause_holds_every_caller_until_it_ends() -> None:
    """After pause_for, no request goes out until the pause is over."""
    gate = RequestGate(1000)
    gate.pause_for(0.3)
    started = time.monotonic()
    assert gate.wait_turn()
    assert time.monotonic() - started >= 0.29


def test_gate__stop_releases_a_waiting_caller() -> None:
    """A stopped gate lets a waiting caller go at once, telling it not to send."""
    gate = RequestGate(1000)
    gate.pause_for(30)
    answers: list[bool] = []
    waiter = threading.Thread(target=lambda: answers.append(gate.wait_turn()))
    waiter.start()
    time.sleep(0.05)
    gate.stop()
    waiter.join(timeout=2)
    assert answers == [False]


def test_gate__limits_requests_across_threads() -> None:
    """Four threads sharing a 10/s gate get no more than 10 turns in any one second."""
    gate = RequestGate(10)
    stamps: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(5):
            gate.wait_turn()
            with lock:
                stamps.append(time.monotonic())

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stamps.sort()
    busiest = max(sum(1 for s in stamps if start <= s < start + 1.0) for start in stamps)
    assert len(stamps) == 20
    assert busiest <= 10
    assert stamps[-1] - stamps[0] >= 0.9  # 20 turns at 10/s cannot all happen in one second
