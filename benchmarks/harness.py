"""What the benchmark scripts share: the fake API in processes of its own, configs, and measuring
a command with every process it starts.

A sync runs as its own `trakt-etl sync` process, so wall time, CPU time and memory are the real
command's, fetch processes included, not the benchmark's:

- CPU: this process becomes a child subreaper (Linux), so every descendant of the command is
  reaped here, and the CPU it used is in this process's RUSAGE_CHILDREN.
- memory: the sum of the resident sets of the command's process tree, sampled every 20 ms; its
  peak is the figure reported.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import yaml

from etl.fakeapi import DEFAULT_API_KEY, FakeTrakt, password_for

_PR_SET_CHILD_SUBREAPER = 36
_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICK = os.sysconf("SC_CLK_TCK")


def usernames(count: int, prefix: str = "user") -> list[str]:
    return [f"{prefix}{n:05d}" for n in range(1, count + 1)]


# --- the fake API in processes of its own --------------------------------------------------------


def _serve_fake(
    control: Connection, port: int, accounts: int, latency_s: float, prefix: str
) -> None:
    """A fake API process: serves on the shared port and takes commands from `control`."""
    import gc

    fake = FakeTrakt(latency_s=latency_s)
    fake.add_generated(accounts, prefix=prefix)
    gc.freeze()  # the accounts live as long as the process
    fake.start(port, reuse_port=True)
    control.send("ready")
    while True:
        try:
            command, args = control.recv()
        except EOFError:
            break
        if command == "stop":
            break
        if command == "set_profile":
            names, fields = args
            for name in names:
                fake.set_profile(name, **fields)
            control.send(len(names))
        elif command == "requests":
            control.send(fake.request_count())
    fake.stop()


class FakeApi:
    """The bundled fake API in `processes` processes sharing one port (SO_REUSEPORT).

    Every process holds every account; changes are applied to all of them, so any process
    answers alike. `cpu_s()` is the CPU time the fake processes have used so far.
    """

    def __init__(
        self, accounts: int, *, latency_ms: float = 0, processes: int = 1, prefix: str = "user"
    ) -> None:
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        context = multiprocessing.get_context("spawn")
        self._controls: list[Connection] = []
        self._processes: list[Any] = []
        for _ in range(processes):
            here, there = context.Pipe()
            process = context.Process(
                target=_serve_fake,
                args=(there, self.port, accounts, latency_ms / 1000, prefix),
                daemon=True,
            )
            process.start()
            self._controls.append(here)
            self._processes.append(process)
        for control in self._controls:
            if not control.poll(300) or control.recv() != "ready":
                raise RuntimeError("the fake API did not start")

    @property
    def pids(self) -> list[int]:
        return [int(process.pid) for process in self._processes]

    def set_profile(self, names: Sequence[str], **fields: Any) -> None:
        for control in self._controls:
            control.send(("set_profile", (list(names), fields)))
        for control in self._controls:
            control.recv()

    def requests(self) -> int:
        total = 0
        for control in self._controls:
            control.send(("requests", None))
            total += int(control.recv())
        return total

    def cpu_s(self) -> float:
        return sum(_process_cpu_s(pid) for pid in self.pids)

    def close(self) -> None:
        for control in self._controls:
            with contextlib.suppress(OSError):
                control.send(("stop", None))
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()

    def __enter__(self) -> FakeApi:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- configs -------------------------------------------------------------------------------------


def write_config(
    directory: Path,
    base_url: str,
    users: list[str],
    database_url: str,
    *,
    log_level: str = "warning",
    **api: Any,
) -> Path:
    config = {
        "database": {"url": database_url},
        "api": {
            "base_url": base_url,
            "api_key": DEFAULT_API_KEY,
            "retries": 0,
            "max_requests_per_s": 100_000,
            **api,
        },
        "logging": {"format": "json", "level": log_level},
        "accounts": [{"username": u, "password": password_for(u)} for u in users],
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


# --- measuring a command and its processes -------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    wall_s: float
    cpu_s: float  # user + system of the command and every process it started
    peak_rss_mb: float  # peak of the summed resident sets of its process tree
    exit_code: int
    processes: int  # how many processes the tree had at its largest


def become_subreaper() -> None:
    """Orphaned descendants are reparented to this process, so their CPU time is counted here."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def measured_sync(config: Path, *extra: str, env: dict[str, str] | None = None) -> Measured:
    """Run `trakt-etl sync` once; measure it with every process it starts."""
    return measured([sys.executable, "-m", "etl", "sync", "-c", str(config), *extra], env=env)


def measured_config_load(config: Path) -> Measured:
    """The same imports and config loading as a sync, and nothing else: its baseline."""
    code = (
        "import os, pathlib, etl.cli; "
        f"etl.cli.load_config(pathlib.Path({str(config)!r}), os.environ)"
    )
    return measured([sys.executable, "-c", code])


def measured(
    command: list[str], *, env: dict[str, str] | None = None, stderr: Any = subprocess.DEVNULL
) -> Measured:
    become_subreaper()
    before = _children_cpu_s()
    started = time.perf_counter()
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=stderr, env={**os.environ, **(env or {})}
    )
    sampler = _TreeSampler(process.pid)
    sampler.start()
    code = process.wait()
    wall = time.perf_counter() - started
    sampler.stop()
    _reap_orphans(sampler.seen - {process.pid})
    return Measured(
        wall_s=wall,
        cpu_s=_children_cpu_s() - before,
        peak_rss_mb=sampler.peak_bytes / 2**20,
        exit_code=code,
        processes=sampler.most,
    )


def _children_cpu_s() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _reap_orphans(pids: set[int], timeout: float = 10.0) -> None:
    """Wait for the command's other processes (reparented here) so their CPU time counts."""
    deadline = time.monotonic() + timeout
    waiting = set(pids)
    while waiting and time.monotonic() < deadline:
        for pid in list(waiting):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not ours (reaped by its own parent): already counted
                waiting.discard(pid)
                continue
            if done:
                waiting.discard(pid)
        if waiting:
            time.sleep(0.01)


class _TreeSampler:
    """Samples the summed RSS of a process and its descendants until stopped.

    Cheap on purpose (it shares the machine with what it measures): it follows the kernel's
    children lists rather than scanning /proc, every 50 ms.
    """

    def __init__(self, root: int, every_s: float = 0.05) -> None:
        self._root = root
        self._every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.peak_bytes = 0
        self.most = 0
        self.seen: set[int] = {root}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            tree = _descendants(self._root) | {self._root}
            self.seen |= tree
            total = sum(_rss_bytes(pid) for pid in tree)
            self.peak_bytes = max(self.peak_bytes, total)
            self.most = max(self.most, len([pid for pid in tree if _rss_bytes(pid)]))
            self._stop.wait(self._every_s)


def _descendants(root: int) -> set[int]:
    found: set[int] = set()
    pending = [root]
    while pending:
        for child in _children(pending.pop()):
            if child not in found:
                found.add(child)
                pending.append(child)
    return found


def _children(pid: int) -> list[int]:
    children: list[int] = []
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return children
    for thread in threads:
        try:
            with open(f"/proc/{pid}/task/{thread}/children", "rb") as listing:
                children += [int(child) for child in listing.read().split()]
        except OSError:
            continue
    return children


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _process_cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


@contextmanager
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="trakt-etl-bench-") as directory:
        yield Path(directory)


def machine() -> dict[str, str]:
    """What ran the benchmark, for the results file."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = "unknown"
    with contextlib.suppress(OSError, IndexError, ValueError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{kib / 2**20:.1f} GiB"
    return {
        "host": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": memory,
        "python": platform.python_version(),
    }


def describe(info: dict[str, str]) -> str:
    return " · ".join(f"{key} {value}" for key, value in info.items())
