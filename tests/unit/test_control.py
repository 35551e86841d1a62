"""When the run's watchdog cancels its database statements, and which ones (etl.control)."""

from __future__ import annotations

import threading
import time

from etl import control as control_module
from etl.control import DatabaseWatchdog, RunControl, shutdown_bound_s


class Recorder:
    """A stand-in for `RunConnections.cancel`: records each call's cut and its time."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, float]] = []
        self.first = threading.Event()

    def __call__(self, *, checked_out_before: float) -> int:
        self.calls.append((time.monotonic(), checked_out_before))
        self.first.set()
        return 1


def test_nothing_is_cancelled_while_the_run_may_go_on() -> None:
    cancel = Recorder()
    with DatabaseWatchdog(RunControl(deadline_s=60), cancel, stop_grace_s=15):
        time.sleep(0.4)
    assert cancel.calls == []


def test_deadline__cancels_what_was_checked_out_before_it_at_once_then_again() -> None:
    """At the deadline, connections taken before it are cut; later ones get CLEANUP_S first."""
    control = RunControl(deadline_s=0.2)
    assert control.deadline is not None
    cancel = Recorder()
    with DatabaseWatchdog(control, cancel, stop_grace_s=15):
        assert cancel.first.wait(2)
        time.sleep(control_module.RECANCEL_S + 0.3)
    (at, cut), (again_at, again_cut) = cancel.calls[:2]
    assert control.deadline <= at < control.deadline + 0.3
    assert cut == control.deadline
    assert again_at - at >= control_module.RECANCEL_S
    assert again_cut == control.deadline  # CLEANUP_S has not passed yet


def test_stop__waits_the_grace_for_writes_in_flight_then_cuts_at_the_stop() -> None:
    control = RunControl(deadline_s=60)
    cancel = Recorder()
    with DatabaseWatchdog(control, cancel, stop_grace_s=0.5):
        stopped = time.monotonic()
        control.request_stop("stopped by SIGTERM")
        assert cancel.first.wait(3)
    at, cut = cancel.calls[0]
    assert at - stopped >= 0.5
    assert stopped <= cut < stopped + 0.2  # what the run takes after the stop is spared


def test_the_watchdog_ends_with_the_run() -> None:
    control = RunControl(deadline_s=0.3)
    cancel = Recorder()
    with DatabaseWatchdog(control, cancel, stop_grace_s=15):
        pass
    time.sleep(0.5)
    assert cancel.calls == []


def test_shutdown_bound__30s_or_the_request_timeout_if_longer() -> None:
    assert (shutdown_bound_s(10), shutdown_bound_s(45)) == (30, 45)
