"""GET /healthz over real HTTP, and how the daemon decides it is healthy (Daemon.health).

The daemon is built in-process with an injected monotonic clock, so that a heartbeat going stale
or a run overstaying its deadline takes no real waiting; the answers go through the real server.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from etl.config import Config
from etl.control import RunControl
from etl.daemon import Daemon
from etl.health import HealthServer
from tests.conftest import healthz

pytestmark = pytest.mark.integration

HEARTBEAT_S = 5.0


class Clock:
    """time.monotonic, moved forward on demand (RunControl's deadlines use the real one)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def daemon(sqlite_url: str, clock: Clock) -> Iterator[Daemon]:
    config = Config.model_validate(
        {
            "database": {"url": sqlite_url},
            "schedule": {"interval": "1m", "heartbeat_s": HEARTBEAT_S},
        }
    )
    built = Daemon(config, load_config=lambda: config, monotonic=clock)
    yield built
    built._engine.dispose()


@pytest.fixture
def port(daemon: Daemon) -> Iterator[int]:
    server = HealthServer("127.0.0.1", 0, daemon.health)
    server.start()
    yield server.port
    server.stop()


def test_healthz__200_with_details_while_the_heartbeat_is_fresh(port: int) -> None:
    status, body = healthz(port)
    assert status == 200
    assert body["status"] == "ok"
    assert body["run_in_progress"] is False
    assert body["heartbeat_age_s"] < 1


def test_healthz__503_once_the_heartbeat_is_three_beats_old_and_200_after_a_beat(
    daemon: Daemon, port: int, clock: Clock
) -> None:
    clock.offset = 3 * HEARTBEAT_S - 0.5
    assert healthz(port)[0] == 200
    clock.offset = 3 * HEARTBEAT_S + 0.5
    status, body = healthz(port)
    assert (status, body["status"]) == (503, "stale")
    assert body["heartbeat_age_s"] >= 3 * HEARTBEAT_S
    daemon._tick()  # the heartbeat job firing again (it also registers the worker)
    status, body = healthz(port)
    assert status == 200
    assert body["worker_id"] is not None


def test_healthz__503_once_a_run_overstays_its_deadline(
    daemon: Daemon, port: int, clock: Clock
) -> None:
    """A run still going two beats past its deadline means the deadline did not work."""
    daemon._current = RunControl(deadline_s=10)  # what _run_job sets while a run goes
    clock.offset = 10 + 2 * HEARTBEAT_S - 1
    daemon._last_tick = clock()  # the scheduler itself still beats
    status, body = healthz(port)
    assert (status, body["run_in_progress"], body["run_overdue"]) == (200, True, False)
    clock.offset = 10 + 2 * HEARTBEAT_S + 1
    daemon._last_tick = clock()
    status, body = healthz(port)
    assert (status, body["status"], body["run_overdue"]) == (503, "stale", True)


def test_healthz__503_while_stopping(daemon: Daemon, port: int) -> None:
    """A daemon shutting down is not to be counted on; the probe must not wait for it."""
    daemon.request_stop("SIGTERM")
    assert healthz(port)[0] == 503


def test_other_paths__404(port: int) -> None:
    assert healthz(port, "/metrics")[0] == 404
    assert healthz(port, "/healthz?verbose=1")[0] == 200
