"""Fetching on several cores: fetch processes, each with threads of its own.

`requests` and the JSON decoder hold the GIL for most of a request's CPU time, so one process
fetches on one core at most. `ProcessFetcher` starts `python -m etl.fetchprocs` processes and
shares the work between them; each runs `etl.fetch.fetch_account` on its threads and sends the
results back to the one writer, in this process. Nothing else changes:

- `api.concurrency` is the total: the threads are split between the processes.
- `api.max_requests_per_s` is the total too: each process paces its share of it, and a pause
  the server asks for (a 429, a spent budget) is passed on to every process.
- Each process holds at most four tasks per thread, so memory stays flat.
- A stop abandons the fetches in flight, as on threads: the processes are killed and those
  accounts stay wholly as they were. A fetch process that dies fails the accounts it held
  (`internal`); the others go on.
- The processes ignore SIGINT and SIGTERM (the parent decides when they end) and exit when
  their parent goes away, whatever killed it: their end of the socket reads EOF.

The messages are pickled over a socket pair: the parent sends ("tasks", [FetchTask, ...]),
("pause", monotonic end) and ("stop",); a process sends ("results", [(account_id, FetchResult |
None), ...]) and ("pause", monotonic end). Both sides are in this module, so the protocol is in
one place.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection, wait
from typing import Any

import structlog

from etl.config import ApiConfig
from etl.control import RunControl
from etl.errors import ErrorKind, FetchError
from etl.fetch import FetchResult, FetchTask, fetch_account
from etl.logs import LogSettings

log = structlog.get_logger("etl.fetchprocs")

# How long a process gets to start and say it is ready.
START_TIMEOUT_S = 60.0


# "auto" starts fetch processes only where one process would be the limit: a run of this many
# accounts or more, allowed this many requests a second or more (one process here manages
# several hundred a second; a slower budget leaves its core idle anyway).
AUTO_MIN_ACCOUNTS = 500
AUTO_MIN_REQUESTS_PER_S = 100.0


def processes_for(api: ApiConfig, accounts: int, cores: int) -> int:
    """How many fetch processes a run of `accounts` uses (0: threads in the sync's process)."""
    if api.fetch_processes != "auto":
        return min(api.fetch_processes, api.concurrency)
    if (
        cores < 2
        or api.concurrency < 2
        or accounts < AUTO_MIN_ACCOUNTS
        or api.max_requests_per_s < AUTO_MIN_REQUESTS_PER_S
    ):
        return 0
    return min(cores, api.concurrency)


def split(total: int, parts: int) -> list[int]:
    """`total` threads shared as evenly as can be between `parts` processes (each gets one)."""
    parts = max(1, min(parts, total))
    return [total // parts + (1 if index < total % parts else 0) for index in range(parts)]


@dataclass
class _Process:
    """One fetch process as the parent sees it."""

    popen: subprocess.Popen[bytes]
    connection: Connection
    threads: int
    in_flight: dict[int, FetchTask] = field(default_factory=dict)

    @property
    def free(self) -> int:
        # Four tasks a thread: enough to keep the process busy while the writer commits a
        # batch (tens of milliseconds, during which nobody hands out tasks).
        return 4 * self.threads - len(self.in_flight)


class ProcessFetcher:
    """Fetches on `processes` fetch processes (see the module docstring)."""

    def __init__(
        self, api: ApiConfig, *, processes: int, run_id: int, logging: LogSettings
    ) -> None:
        self._processes: list[_Process] = []
        shares = split(api.concurrency, processes)
        try:
            for threads in shares:
                self._processes.append(
                    _start(
                        {
                            "api": api,
                            "threads": threads,
                            "per_second": api.max_requests_per_s / len(shares),
                            "run_id": run_id,
                            "logging": logging,
                        },
                        threads,
                    )
                )
            for process in self._processes:
                _expect_ready(process)
        except BaseException:
            self.close()
            raise
        log.debug("fetch.processes_started", processes=len(shares), threads=shares)

    def results(
        self, tasks: Iterator[FetchTask], control: RunControl, tick_s: float
    ) -> Iterator[FetchResult | None]:
        exhausted = False
        while control.reason() is None:
            if not self._processes:
                control.request_stop("every fetch process died")
                return
            if not exhausted:
                exhausted = self._hand_out(tasks)
            busy = [p for p in self._processes if p.in_flight]
            if not busy:
                return  # every task handed out has come back, and there are no more
            left = control.time_left()
            ready = wait(
                [p.connection for p in busy],
                timeout=tick_s if left is None else min(left + 0.01, tick_s),
            )
            if not ready:
                yield None
                continue
            for process in [p for p in busy if p.connection in ready]:
                yield from self._receive(process, control)

    def _hand_out(self, tasks: Iterator[FetchTask]) -> bool:
        """Fill each process up to its share, one message each; True once no task is left."""
        for process in sorted(self._processes, key=lambda p: p.free, reverse=True):
            batch = list(itertools.islice(tasks, max(0, process.free)))
            if not batch:
                return process.free > 0  # no task came although there was room: none left
            for task in batch:
                process.in_flight[task.account_id] = task
            # If it died, _receive finds out and fails what it held, these included.
            with contextlib.suppress(OSError):
                process.connection.send(("tasks", batch))
        return False

    def _receive(self, process: _Process, control: RunControl) -> Iterator[FetchResult]:
        try:
            message = process.connection.recv()
        except (EOFError, OSError):
            yield from self._died(process)
            return
        if message[0] == "results":
            for account_id, result in message[1]:
                process.in_flight.pop(account_id, None)
                if result is not None and control.reason() is None:
                    yield result
        elif message[0] == "pause":
            for other in self._processes:
                if other is not process:
                    with contextlib.suppress(OSError):
                        other.connection.send(message)

    def _died(self, process: _Process) -> Iterator[FetchResult]:
        """A process that died fails the accounts it held; the others go on."""
        self._processes.remove(process)
        code = process.popen.poll()
        if code is None:
            process.popen.kill()
            code = process.popen.wait()
        log.error("fetch.process_died", pid=process.popen.pid, exit_code=code)
        for task in process.in_flight.values():
            yield _failed(task, f"the fetch process died (exit status {code})")
        process.connection.close()

    def close(self) -> None:
        """End every process now; fetches still in flight are abandoned."""
        for process in self._processes:
            with contextlib.suppress(OSError):
                process.connection.send(("stop",))
        deadline = time.monotonic() + 2.0
        for process in self._processes:
            try:
                process.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.popen.wait()
            process.connection.close()
        self._processes.clear()


def _failed(task: FetchTask, message: str) -> FetchResult:
    now = datetime.now(UTC)
    return FetchResult(
        account_id=task.account_id,
        username=task.account.username,
        started_at=now,
        finished_at=now,
        elapsed_s=0.0,
        api_version=task.api_version,
        attempts=1,
        http_status=None,
        error=FetchError(ErrorKind.INTERNAL, message),
    )


def _start(init: dict[str, Any], threads: int) -> _Process:
    parent_end, child_end = socket.socketpair()
    try:
        popen = subprocess.Popen(
            [sys.executable, "-m", "etl.fetchprocs", str(child_end.fileno())],
            pass_fds=[child_end.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
    finally:
        child_end.close()
    connection = Connection(parent_end.detach())
    connection.send(("init", init))
    return _Process(popen, connection, threads)


def _expect_ready(process: _Process) -> None:
    if not process.connection.poll(START_TIMEOUT_S):
        raise RuntimeError(f"a fetch process did not start within {START_TIMEOUT_S:g}s")
    try:
        message = process.connection.recv()
    except EOFError:
        raise RuntimeError(
            f"a fetch process exited at start (status {process.popen.wait()})"
        ) from None
    if message != ("ready",):
        raise RuntimeError(f"a fetch process said {message!r} instead of being ready")


# --- the fetch process ----------------------------------------------------------------------------


def serve(connection: Connection) -> None:
    """A fetch process's life: take tasks, fetch them on threads, send the results back."""
    from etl.client import TraktClient
    from etl.logs import configure_logging
    from etl.ratelimit import RequestGate
    from etl.redact import Redactor

    _, init = connection.recv()
    settings: LogSettings = init["logging"]
    configure_logging(format=settings.format, level=settings.level, secrets=settings.secrets)
    sending = threading.Lock()

    def send(message: tuple[Any, ...]) -> None:
        with sending, contextlib.suppress(OSError):
            connection.send(message)

    stop = threading.Event()
    gate = RequestGate(
        init["per_second"], stop=stop, on_pause=lambda until: send(("pause", until))
    )
    def backoff(seconds: float) -> None:  # retry waits end at once when told to stop
        stop.wait(seconds)

    client = TraktClient(
        init["api"], gate=gate, redactor=Redactor(settings.secrets), sleep=backoff
    )
    run_id = init["run_id"]

    outbox: queue.SimpleQueue[tuple[int, FetchResult | None]] = queue.SimpleQueue()

    def fetch(task: FetchTask) -> None:
        try:
            result = fetch_account(client, task, run_id)
        except BaseException as exc:  # never leave the parent waiting for an answer
            log.exception("fetch.task_crashed")
            result = _failed(task, f"{type(exc).__name__} in a fetch process")
        outbox.put((task.account_id, result))

    def deliver() -> None:
        """Send the results as they come, several to a message when several are waiting:
        a message per result cost the parent more than the rest of an unchanged account."""
        while True:
            results = [outbox.get()]
            while len(results) < 256:
                try:
                    results.append(outbox.get_nowait())
                except queue.Empty:
                    break
            send(("results", results))

    threading.Thread(target=deliver, name="deliver", daemon=True).start()

    pool = ThreadPoolExecutor(max_workers=init["threads"], thread_name_prefix="fetch")
    send(("ready",))
    while True:
        try:
            message = connection.recv()
        except (EOFError, OSError):
            break  # the parent is gone
        if message[0] == "tasks":
            for task in message[1]:
                pool.submit(fetch, task)
        elif message[0] == "pause":
            gate.pause_until(message[1])
        else:
            break
    stop.set()
    # Fetches in flight are abandoned, as the parent asked (or the parent is gone).
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str]) -> None:
    # The parent decides when fetch processes end: a Ctrl-C or a SIGTERM sent to the whole
    # group (systemd does) must not end them before the parent has closed the run.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    serve(Connection(int(argv[0])))


if __name__ == "__main__":
    main(sys.argv[1:])
