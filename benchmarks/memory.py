"""Does memory stay flat as the account list grows? Peak RSS of a sync of N accounts.

    python benchmarks/memory.py [--accounts 2000 20000]

Each sync is a separate `trakt-etl sync` process (fresh SQLite database, fake API in its own
process, no latency), so the peak is that command's own, config loading included. The config
alone grows with the account list (it is in memory by design), so the same config is also
loaded alone (same imports, same code): the difference is what the sync itself adds.
"""

from __future__ import annotations

import argparse

from benchmarks.harness import (
    FakeApi,
    describe,
    machine,
    measured_config_load,
    measured_sync,
    scratch,
    usernames,
    write_config,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()

    print(f"{describe(machine())}\nconcurrency {args.concurrency}, no latency, SQLite")
    print(
        f"{'accounts':>8} {'sync peak MB':>12} {'config MB':>9} {'sync adds MB':>12} "
        f"{'wall s':>7} {'cpu s':>6} {'exit':>4}"
    )
    peaks, added = {}, {}
    with FakeApi(max(args.accounts)) as fake:
        for count in args.accounts:
            with scratch() as directory:
                config = write_config(
                    directory,
                    fake.base_url,
                    usernames(count),
                    f"sqlite:///{directory / 'bench.db'}",
                    concurrency=args.concurrency,
                )
                result = measured_sync(config)
                config_only = measured_config_load(config)
            peaks[count] = result.peak_rss_mb
            added[count] = result.peak_rss_mb - config_only.peak_rss_mb
            print(
                f"{count:>8} {result.peak_rss_mb:>12.1f} {config_only.peak_rss_mb:>9.1f} "
                f"{added[count]:>12.1f} {result.wall_s:>7.1f} {result.cpu_s:>6.1f} "
                f"{result.exit_code:>4}"
            )
    low, high = min(peaks), max(peaks)
    print(
        f"{high} vs {low} accounts: peak +{peaks[high] - peaks[low]:.1f} MB in all, "
        f"+{added[high] - added[low]:.1f} MB from the sync beyond its config"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
