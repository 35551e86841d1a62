"""The process leaves after its command even when a thread it would join at exit is stuck."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

STUCK_POOL_THREAD = """
import sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from etl.cli import _exit_past_stuck_threads

# A scheduler's pool thread stuck in a run: Python joins such threads at exit, daemon or not.
pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ThreadPoolExecutor")
started = threading.Event()
pool.submit(lambda: (started.set(), time.sleep(60)))
started.wait()
print("leaving", flush=True)
_exit_past_stuck_threads({code})
"""

FINISHING_POOL_THREAD = """
import time
from concurrent.futures import ThreadPoolExecutor
from etl.cli import _exit_past_stuck_threads

pool = ThreadPoolExecutor(max_workers=1)
pool.submit(time.sleep, 0.3)
pool.shutdown(wait=False)
_exit_past_stuck_threads(0)
print("joined normally", flush=True)
"""


def run(script: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=False
    )
    return done, time.monotonic() - started


@pytest.mark.parametrize("code", [0, 1])
def test_a_stuck_pool_thread__is_left_behind_after_a_short_grace(code: int) -> None:
    done, took = run(STUCK_POOL_THREAD.format(code=code))
    assert done.returncode == code, done.stderr
    assert done.stdout == "leaving\n"
    assert took < 10


def test_a_finishing_thread__is_waited_for_and_the_exit_is_normal() -> None:
    done, took = run(FINISHING_POOL_THREAD)
    assert (done.returncode, done.stdout) == (0, "joined normally\n"), done.stderr
    assert took < 10
