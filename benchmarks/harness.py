"""What the benchmark scripts share: the fake API in its own process, configs, and a measured sync.

A sync runs as its own `trakt-etl sync` process, so wall time, CPU time and peak memory are the
real command's (read with os.wait4), not the benchmark's.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from etl.fakeapi import DEFAULT_API_KEY, password_for


@contextmanager
def fake_api(accounts: int, latency_ms: float = 0, prefix: str = "user") -> Iterator[str]:
    """The bundled fake API in a separate process; yields its base URL."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "etl.fakeapi",
            "--port",
            "0",
            "--accounts",
            str(accounts),
            "--latency-ms",
            str(latency_ms),
            "--prefix",
            prefix,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        base_url = process.stdout.readline().strip()
        if not base_url.startswith("http"):
            raise RuntimeError(f"the fake API did not start: {base_url!r}")
        yield base_url
    finally:
        process.terminate()
        process.wait(timeout=30)


def usernames(count: int, prefix: str = "user") -> list[str]:
    return [f"{prefix}{n:05d}" for n in range(1, count + 1)]


def write_config(
    directory: Path, base_url: str, users: list[str], database_url: str, **api: Any
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
        "logging": {"format": "json", "level": "warning"},
        "accounts": [{"username": u, "password": password_for(u)} for u in users],
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@dataclass(frozen=True)
class Measured:
    wall_s: float
    cpu_s: float  # user + system of the sync process
    peak_rss_mb: float
    exit_code: int


def measured_sync(config: Path, *extra: str) -> Measured:
    """Run `trakt-etl sync` once and measure that process alone."""
    return measured([sys.executable, "-m", "etl", "sync", "-c", str(config), *extra])


def measured_config_load(config: Path) -> Measured:
    """The same imports and config loading as a sync, and nothing else: its baseline."""
    code = (
        "import os, pathlib, etl.cli; "
        f"etl.cli.load_config(pathlib.Path({str(config)!r}), os.environ)"
    )
    return measured([sys.executable, "-c", code])


def measured(command: list[str]) -> Measured:
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    return Measured(
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        peak_rss_mb=usage.ru_maxrss / 1024,  # Linux reports KiB
        exit_code=os.waitstatus_to_exitcode(status),
    )


@contextmanager
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="trakt-etl-bench-") as directory:
        yield Path(directory)


def machine() -> str:
    return (
        f"{platform.node()} · {platform.system()} {platform.release()} · "
        f"{os.cpu_count()} cores · Python {platform.python_version()}"
    )
