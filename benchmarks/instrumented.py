"""`trakt-etl` with its SQL counted: `python -m benchmarks.instrumented STATS.json sync -c ...`.

The command runs unchanged in this process; a SQLAlchemy cursor listener (on every engine)
counts the statements it sends, by kind, with the rows they touched (the driver's rowcount) and
the time spent in the driver, and writes them to STATS.json at exit. The listener costs about a
microsecond a statement; an executemany is one statement with many parameter sets. PostgreSQL's
COPY goes to the driver directly, past SQLAlchemy's events, so `etl.bulk._copy` is wrapped to
count it the same way (one statement, its rows, its time, row formatting included).
"""

from __future__ import annotations

import atexit
import json
import sys
import time
from collections import defaultdict
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

_stats: dict[str, dict[str, float]] = defaultdict(
    lambda: {"statements": 0, "parameter_sets": 0, "rows": 0, "seconds": 0.0}
)
_started: dict[int, float] = {}


@event.listens_for(Engine, "before_cursor_execute")
def _before(
    _conn: Any, cursor: Any, _statement: str, _params: Any, _context: Any, _many: bool
) -> None:
    _started[id(cursor)] = time.perf_counter()


@event.listens_for(Engine, "after_cursor_execute")
def _after(
    _conn: Any, cursor: Any, statement: str, params: Any, _context: Any, executemany: bool
) -> None:
    kind = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else "OTHER"
    entry = _stats[kind]
    entry["statements"] += 1
    entry["parameter_sets"] += len(params) if executemany else 1
    rowcount = getattr(cursor, "rowcount", -1)
    if kind in ("INSERT", "UPDATE", "DELETE") and rowcount and rowcount > 0:
        entry["rows"] += rowcount
    entry["seconds"] += time.perf_counter() - _started.pop(id(cursor), time.perf_counter())


def _count_copies() -> None:
    from etl import bulk

    copy = bulk._copy

    def counted(connection: Any, table: Any, rows: Any) -> None:
        started = time.perf_counter()
        copy(connection, table, rows)
        entry = _stats["COPY"]
        entry["statements"] += 1
        entry["parameter_sets"] += len(rows)
        entry["rows"] += len(rows)
        entry["seconds"] += time.perf_counter() - started

    bulk._copy = counted


def main() -> int:
    path, argv = sys.argv[1], sys.argv[2:]

    def write() -> None:
        with open(path, "w", encoding="utf-8") as out:
            json.dump(_stats, out)

    atexit.register(write)
    _count_copies()
    from etl.cli import main as cli

    code = cli(argv)
    write()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
