"""The sync against the floor of what this machine can do with the same libraries.

    python -m benchmarks.bench_sync [--sizes 1000 10000 100000] [--latencies 0 50]
                                    [--databases sqlite postgresql] [--postgres ADMIN_URL]

For each server latency and each N accounts, on each database: a first sync, an unchanged
re-sync, and a re-sync after ~10% of the accounts changed, each a real `trakt-etl sync` process
(info logging, as in production, to /dev/null) against the bundled fake API running in processes
of its own. Measured for each: wall time, CPU time (user + system of every process of the
sync), peak memory (summed RSS of its processes), SQL statements and rows written.

Next to them, the floors, measured in the same run:
  (a) a bare fetch of the same N payloads with requests: the same concurrency, keep-alive
      sessions and JSON decoding, nothing else, in one process (`benchmarks.floors fetch`);
  (b) a bare executemany of the same normalized rows into empty tables (`floors insert`);
  (c) the latency bound: N × latency / concurrency.
The fake API is checked first: it must be able to serve at least 10× the sync's request rate.

Results are printed, and written with the machine's description to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from benchmarks.harness import (
    FakeApi,
    Measured,
    describe,
    machine,
    measured,
    scratch,
    usernames,
    write_config,
)
from etl.fakeapi import DEFAULT_API_KEY, password_for, sha1_hex

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
HISTORY = ("profile_history", "connection_history", "sharing_text_history")
COUNTED = (*HISTORY, "change_events", "raw_payloads", "account_syncs", "accounts")
# At 50 ms a request, 8 at a time would need 10 minutes for 100,000 accounts per sync.
CONCURRENCY = {0: 16, 50: 64}


@dataclass
class SyncRun:
    kind: str  # first | unchanged | changed
    measured: Measured
    statements: int
    rows_inserted: int
    rows_updated: int
    db_seconds: float
    history_rows: int
    change_events: int
    fake_cpu_s: float

    def per_account_ms(self, accounts: int, what: str) -> float:
        return float(getattr(self.measured, what)) * 1000 / accounts


@dataclass
class Cell:
    accounts: int
    latency_ms: float
    concurrency: int
    fetch_floor: Measured
    fetch_floor_fake_cpu_s: float
    fetch_floor_requests: int
    insert_floor: dict[str, dict[str, float]] = field(default_factory=dict)  # db -> cpu, wall
    syncs: dict[str, list[SyncRun]] = field(default_factory=dict)  # db -> runs

    @property
    def latency_bound_s(self) -> float:
        return self.accounts * self.latency_ms / 1000 / self.concurrency


# --- databases -----------------------------------------------------------------------------------


@contextmanager
def database(kind: str, directory: Path, postgres_admin: str) -> Iterator[str]:
    """A fresh, empty database of `kind`, dropped afterwards."""
    if kind == "sqlite":
        path = directory / f"bench-{uuid.uuid4().hex[:8]}.db"
        yield f"sqlite:///{path}"
        return
    admin = create_engine(postgres_admin, isolation_level="AUTOCOMMIT")
    name = f"trakt_etl_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def table_counts(url: str) -> dict[str, int]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            found = {}
            for table in COUNTED:
                try:
                    found[table] = int(
                        connection.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one()
                    )
                except Exception:  # before the first sync made the schema
                    connection.rollback()
                    found[table] = 0
            return found
    finally:
        engine.dispose()


# --- the measured pieces -------------------------------------------------------------------------


def python(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def run_sync(kind: str, config: Path, url: str, fake: FakeApi, directory: Path) -> SyncRun:
    stats_path = directory / f"stats-{uuid.uuid4().hex[:8]}.json"
    before = table_counts(url)
    fake_before = fake.cpu_s()
    result = measured(python("benchmarks.instrumented", str(stats_path), "sync", "-c", str(config)))
    fake_cpu = fake.cpu_s() - fake_before
    after = table_counts(url)
    if result.exit_code != 0:
        raise RuntimeError(f"{kind} sync exited {result.exit_code}")
    stats = json.loads(stats_path.read_text())
    return SyncRun(
        kind=kind,
        measured=result,
        statements=int(sum(entry["statements"] for entry in stats.values())),
        rows_inserted=int(sum(stats.get(kind, {}).get("rows", 0) for kind in ("INSERT", "COPY"))),
        rows_updated=int(stats.get("UPDATE", {}).get("rows", 0)),
        db_seconds=sum(entry["seconds"] for entry in stats.values()),
        history_rows=sum(after[t] - before[t] for t in HISTORY),
        change_events=after["change_events"] - before["change_events"],
        fake_cpu_s=fake_cpu,
    )


def insert_floor(url: str, accounts: int) -> dict[str, float]:
    done = subprocess.run(
        python("benchmarks.floors", "insert", url, str(accounts)),
        capture_output=True,
        text=True,
        check=True,
    )
    cpu, wall, rows = done.stdout.split()
    return {"cpu_s": float(cpu), "wall_s": float(wall), "rows": float(rows)}


def run_cell(
    fake: FakeApi,
    accounts: int,
    latency_ms: float,
    concurrency: int,
    databases: list[str],
    postgres_admin: str,
) -> Cell:
    users = usernames(accounts)
    # Once untimed: the fake serializes an account's answer the first time it serves it.
    subprocess.run(
        python("benchmarks.floors", "fetch", fake.base_url, str(accounts), str(concurrency)),
        check=True,
    )
    requests_before, fake_before = fake.requests(), fake.cpu_s()
    floor = measured(
        python("benchmarks.floors", "fetch", fake.base_url, str(accounts), str(concurrency))
    )
    cell = Cell(
        accounts=accounts,
        latency_ms=latency_ms,
        concurrency=concurrency,
        fetch_floor=floor,
        fetch_floor_fake_cpu_s=fake.cpu_s() - fake_before,
        fetch_floor_requests=fake.requests() - requests_before,
    )
    print(f"  floor (a) fetch: {floor.wall_s:.2f} s wall, {floor.cpu_s:.2f} s CPU", flush=True)
    with scratch() as directory:
        for kind in databases:
            with database(kind, directory, postgres_admin) as url:
                cell.insert_floor[kind] = insert_floor(url, accounts)
            with database(kind, directory, postgres_admin) as url:
                config = write_config(
                    directory, fake.base_url, users, url, log_level="info", concurrency=concurrency
                )
                runs = [run_sync("first", config, url, fake, directory)]
                runs.append(run_sync("unchanged", config, url, fake, directory))
                fake.set_profile(users[::10], location=f"moved at {datetime.now(UTC):%H:%M:%S}")
                runs.append(run_sync("changed", config, url, fake, directory))
                cell.syncs[kind] = runs
                for run in runs:
                    m = run.measured
                    print(
                        f"  {kind:<10} {run.kind:<9} {m.wall_s:7.2f} s wall {m.cpu_s:7.2f} s CPU "
                        f"{m.peak_rss_mb:6.0f} MB {run.statements:>7} stmts "
                        f"{run.history_rows:>7} history rows",
                        flush=True,
                    )
    return cell


# --- reporting -----------------------------------------------------------------------------------


def ratio(value: float, floor: float) -> str:
    return f"{value / floor:.2f}×" if floor > 0 else "n/a"


def cell_table(cell: Cell, cores: int) -> list[str]:
    n = cell.accounts
    floor_cpu = cell.fetch_floor.cpu_s * 1000 / n
    floor_wall = cell.fetch_floor.wall_s
    cpu_floor_s = cell.fetch_floor.cpu_s / cores
    lines = [
        f"### {n:,} accounts, latency {cell.latency_ms:g} ms, concurrency {cell.concurrency}",
        "",
        f"Floors: (a) fetch {floor_wall:.2f} s wall, {floor_cpu:.3f} ms CPU/account, "
        f"{cell.fetch_floor.peak_rss_mb:.0f} MB; (c) latency bound {cell.latency_bound_s:.2f} s; "
        f"CPU floor (a)/{cores} cores {cpu_floor_s:.2f} s.",
        "",
        "| db | sync | wall s | vs (a) wall | vs max(c, CPU floor) | CPU ms/acct | vs (a) "
        "| vs (a)+(b) | peak MB | stmts/acct | DB ms/acct | rows ins/acct | rows upd/acct "
        "| history rows | change events |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, runs in cell.syncs.items():
        floor_b = cell.insert_floor[kind]["cpu_s"] * 1000 / n
        for run in runs:
            m = run.measured
            cpu = m.cpu_s * 1000 / n
            bound = max(cell.latency_bound_s, cpu_floor_s)
            lines.append(
                f"| {kind} | {run.kind} | {m.wall_s:.2f} | {ratio(m.wall_s, floor_wall)} "
                f"| {ratio(m.wall_s, bound)} | {cpu:.3f} | {ratio(cpu, floor_cpu)} "
                f"| {ratio(cpu, floor_cpu + floor_b)} | {m.peak_rss_mb:.0f} "
                f"| {run.statements / n:.2f} | {run.db_seconds * 1000 / n:.3f} "
                f"| {run.rows_inserted / n:.2f} | {run.rows_updated / n:.2f} "
                f"| {run.history_rows} | {run.change_events} |"
            )
    lines.append("")
    floors_b = ", ".join(
        f"{kind} {floor['cpu_s'] * 1000 / n:.3f} ms CPU/account ({floor['rows']:.0f} rows)"
        for kind, floor in cell.insert_floor.items()
    )
    lines += [f"Floor (b) executemany: {floors_b}.", ""]
    return lines


def fake_capacity(fake: FakeApi, seconds: float = 4.0) -> float | None:
    """Requests/s the fake API's processes serve to wrk (a C load generator, when installed):
    a client far cheaper than any Python one, so the fake is the limit."""
    wrk = shutil.which("wrk")
    if wrk is None:
        return None
    user = usernames(1)[0]
    body = json.dumps({"username": user, "password": sha1_hex(password_for(user))})
    with scratch() as directory:
        script = directory / "post.lua"
        script.write_text(
            'wrk.method = "POST"\n'
            f"wrk.body = {json.dumps(body)}\n"
            'wrk.headers["Content-Type"] = "application/json"\n',
            encoding="utf-8",
        )
        done = subprocess.run(
            [wrk, "-t1", "-c32", f"-d{seconds:g}s", "-s", str(script),
             f"{fake.base_url}/account/settings/{DEFAULT_API_KEY}"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    found = re.search(r"Requests/sec:\s*([\d.]+)", done.stdout)
    return float(found.group(1)) if found else None


def fake_check(cells: list[Cell], capacity: float | None, fake_processes: int) -> list[str]:
    """Can the fake serve 10× the sync's request rate?"""
    lines = ["### The fake API is not the bottleneck", ""]
    fastest = max(
        (
            cell.accounts / run.measured.wall_s
            for cell in cells
            if not cell.latency_ms
            for runs in cell.syncs.values()
            for run in runs
        ),
        default=0.0,
    )
    costs = [
        run.fake_cpu_s / cell.accounts
        for cell in cells
        for runs in cell.syncs.values()
        for run in runs
    ]
    worst = max(costs, default=0.0)
    if capacity is None and worst:
        capacity = fake_processes / worst
        how = f"estimated from its CPU time ({fake_processes} processes, wrk not installed)"
    else:
        how = "measured with wrk (32 connections)"
    if not fastest or not capacity:
        return lines
    verdict = "ok" if capacity >= 10 * fastest else "TOO SLOW"
    lines += [
        f"- capacity: {capacity:,.0f} requests/s, {how}",
        f"- while serving the syncs it spent at most {worst * 1e6:.0f} µs of CPU a request "
        "(one request at a time from a slow client is its most expensive case)",
        f"- the fastest sync asked {fastest:,.0f} requests/s: capacity / rate = "
        f"{capacity / fastest:.1f}× ({verdict}; 10× needed)",
        "",
    ]
    return lines


def targets(cells: list[Cell], cores: int) -> list[str]:
    """The issue's six targets, measured."""
    by = {(c.accounts, c.latency_ms): c for c in cells}
    lines = ["### Targets", ""]

    def run(cell: Cell, kind: str, db: str) -> SyncRun | None:
        return next((r for r in cell.syncs.get(db, []) if r.kind == kind), None)

    for db in sorted({db for c in cells for db in c.syncs}):
        ten, hundred = by.get((10_000, 0)), by.get((100_000, 0))
        if ten:
            floor_a = ten.fetch_floor.cpu_s
            floor_b = ten.insert_floor[db]["cpu_s"]
            unchanged, first = run(ten, "unchanged", db), run(ten, "first", db)
            if unchanged:
                lines.append(
                    f"- {db}: 1. unchanged re-sync of 10,000, CPU {unchanged.measured.cpu_s:.2f} s "
                    f"vs floor (a) {floor_a:.2f} s: {ratio(unchanged.measured.cpu_s, floor_a)} "
                    f"(target ≤ 1.3×), history rows {unchanged.history_rows}, change events "
                    f"{unchanged.change_events}"
                )
            if first:
                lines.append(
                    f"- {db}: 2. first sync of 10,000, CPU {first.measured.cpu_s:.2f} s vs (a)+(b) "
                    f"{floor_a + floor_b:.2f} s: {ratio(first.measured.cpu_s, floor_a + floor_b)} "
                    "(target ≤ 1.6×)"
                )
            walls = [r.measured.wall_s for r in ten.syncs.get(db, [])]
            if walls:
                lines.append(
                    f"- {db}: 3. wall of 10,000 at 0 ms, {min(walls):.2f}-{max(walls):.2f} s vs "
                    f"single-process floor (a) {ten.fetch_floor.wall_s:.2f} s: "
                    f"{ratio(max(walls), ten.fetch_floor.wall_s)} at worst (target ≤ 0.6×)"
                )
        slow = by.get((10_000, 50))
        if slow:
            bound = max(slow.latency_bound_s, slow.fetch_floor.cpu_s / cores)
            walls = [r.measured.wall_s for r in slow.syncs.get(db, [])]
            if walls:
                lines.append(
                    f"- {db}: 4. wall of 10,000 at 50 ms, worst {max(walls):.2f} s vs "
                    f"max(latency bound {slow.latency_bound_s:.2f} s, CPU floor "
                    f"{slow.fetch_floor.cpu_s / cores:.2f} s): {ratio(max(walls), bound)} "
                    "(target ≤ 1.3×)"
                )
        if ten and hundred:
            for kind in ("first", "unchanged", "changed"):
                small, large = run(ten, kind, db), run(hundred, kind, db)
                if not (small and large):
                    continue
                lines.append(
                    f"- {db}: 5. peak memory, {kind}: {large.measured.peak_rss_mb:.0f} MB at "
                    f"100,000 vs {small.measured.peak_rss_mb:.0f} MB at 10,000: "
                    f"{ratio(large.measured.peak_rss_mb, small.measured.peak_rss_mb)} "
                    "(target ≤ 1.2×)"
                )
                per_small = small.measured.wall_s / 10_000
                per_large = large.measured.wall_s / 100_000
                cpu_small = small.measured.cpu_s / 10_000
                cpu_large = large.measured.cpu_s / 100_000
                lines.append(
                    f"- {db}: 6. linear, {kind}: {per_large * 1000:.3f} vs {per_small * 1000:.3f} "
                    f"ms wall/account ({ratio(per_large, per_small)}), {cpu_large * 1000:.3f} vs "
                    f"{cpu_small * 1000:.3f} ms CPU/account ({ratio(cpu_large, cpu_small)}) "
                    "(target ≤ 1.2×)"
                )
    return [*lines, ""]


def versions(postgres_admin: str, databases: list[str]) -> dict[str, str]:
    import importlib.metadata as metadata
    import sqlite3

    found = {"sqlite": sqlite3.sqlite_version, "wrk": shutil.which("wrk") or "not installed"}
    for package in ("trakt-etl", "SQLAlchemy", "requests", "urllib3", "psycopg", "uvloop"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    if "postgresql" in databases:
        engine = create_engine(postgres_admin)
        with engine.connect() as connection:
            found["postgresql"] = str(connection.execute(text("SHOW server_version")).scalar())
        engine.dispose()
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--latencies", type=float, nargs="+", default=[0, 50])
    parser.add_argument("--databases", nargs="+", default=["sqlite", "postgresql"])
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES, help="an admin URL")
    parser.add_argument(
        "--concurrency", type=int, help="api.concurrency (default: 16 at 0 ms, 64 at 50 ms)"
    )
    parser.add_argument(
        "--fake-processes", type=int, default=os.cpu_count() or 1, help="fake API processes"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    cores = os.cpu_count() or 1
    info = machine()
    library = versions(args.postgres, args.databases)
    print(describe(info))
    print(describe(library))
    cells: list[Cell] = []
    capacity: float | None = None
    for latency in args.latencies:
        concurrency = args.concurrency or CONCURRENCY.get(int(latency), 16)
        with FakeApi(max(args.sizes), latency_ms=latency, processes=args.fake_processes) as fake:
            if not latency:
                capacity = fake_capacity(fake)
                print(f"fake API capacity: {capacity or 'unknown (no wrk)'} requests/s")
            for accounts in args.sizes:
                print(f"{accounts:,} accounts, latency {latency:g} ms, concurrency {concurrency}")
                cells.append(
                    run_cell(fake, accounts, latency, concurrency, args.databases, args.postgres)
                )

    report = [
        f"# bench_sync, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {describe(info)}",
        "",
        f"Libraries: {describe(library)}",
        "",
        *fake_check(cells, capacity, min(args.fake_processes, cores)),
        *targets(cells, cores),
    ]
    for cell in cells:
        report += cell_table(cell, cores)
    text_report = "\n".join(report)
    print()
    print(text_report)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.now(UTC):%Y-%m-%d-%H%M}-{info['host']}"
    (args.out / f"{stem}.md").write_text(text_report + "\n", encoding="utf-8")
    raw: dict[str, Any] = {
        "machine": info,
        "versions": library,
        "fake_capacity_per_s": capacity,
        "cells": [asdict(cell) for cell in cells],
    }
    (args.out / f"{stem}.json").write_text(json.dumps(raw, indent=1), encoding="utf-8")
    print(f"\nwritten to {args.out / stem}.md and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
