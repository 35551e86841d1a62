"""Is concurrency real? One sync of N accounts at a given server latency, concurrency 1 vs 16.

    python benchmarks/concurrency.py [--accounts 400] [--latency-ms 50]

Each sync is a fresh SQLite database and a separate `trakt-etl sync` process against the fake
API in its own process. With 50 ms of latency, one worker cannot beat N × 50 ms; sixteen should
come close to N × 50 ms / 16.
"""

from __future__ import annotations

import argparse

from benchmarks.harness import (
    FakeApi,
    describe,
    machine,
    measured_sync,
    scratch,
    usernames,
    write_config,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=400)
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()

    users = usernames(args.accounts)
    print(f"{describe(machine())}\n{args.accounts} accounts, {args.latency_ms:g} ms server latency")
    print(f"{'concurrency':>11} {'wall s':>8} {'cpu s':>7} {'floor s':>8} {'exit':>4}")
    results = {}
    with FakeApi(args.accounts, latency_ms=args.latency_ms) as fake:
        for workers in args.concurrency:
            with scratch() as directory:
                config = write_config(
                    directory,
                    fake.base_url,
                    users,
                    f"sqlite:///{directory / 'bench.db'}",
                    concurrency=workers,
                )
                result = measured_sync(config)
            floor = args.accounts * args.latency_ms / 1000 / workers
            results[workers] = result
            print(
                f"{workers:>11} {result.wall_s:>8.2f} {result.cpu_s:>7.2f} {floor:>8.2f} "
                f"{result.exit_code:>4}"
            )
    low, high = min(results), max(results)
    print(
        f"speed-up {low} → {high} workers: {results[low].wall_s / results[high].wall_s:.1f}×; "
        f"ratio {results[high].wall_s / results[low].wall_s:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
