"""What the write path costs: SQL statements and milliseconds of database time per account.

    python -m benchmarks.statements [--accounts 1000] [--postgres URL]

For a first sync and an unchanged re-sync, on SQLite and PostgreSQL, every statement the sync
sends is counted and timed (SQLAlchemy's cursor events). The sync runs in this process against
the fake API in another, with the production code path (`Syncer`).
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, create_engine, event, text

from benchmarks.harness import fake_api, machine, scratch, usernames
from etl import db
from etl.client import TraktClient
from etl.config import Config
from etl.fakeapi import DEFAULT_API_KEY, password_for
from etl.logs import configure_logging
from etl.sync import Syncer


@dataclass
class Counter:
    statements: int = 0
    seconds: float = 0.0
    history_rows: int = 0


@contextmanager
def counting(engine: Engine) -> Iterator[Counter]:
    counter = Counter()
    started: dict[int, float] = {}

    def before(_conn: Any, cursor: Any, *_args: Any) -> None:
        started[id(cursor)] = time.perf_counter()

    def after(_conn: Any, cursor: Any, statement: str, *_args: Any) -> None:
        counter.statements += 1
        counter.seconds += time.perf_counter() - started.pop(id(cursor), time.perf_counter())

    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine, "after_cursor_execute", after)
    try:
        yield counter
    finally:
        event.remove(engine, "before_cursor_execute", before)
        event.remove(engine, "after_cursor_execute", after)


def history_rows(engine: Engine) -> int:
    with engine.connect() as connection:
        return sum(
            int(connection.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one())
            for table in ("profile_history", "connection_history", "sharing_text_history")
        )


@contextmanager
def postgres_database(admin_url: str) -> Iterator[str]:
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"trakt_etl_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def measure(label: str, database_url: str, base_url: str, users: list[str]) -> None:
    config = Config.model_validate(
        {
            "database": {"url": database_url},
            "api": {
                "base_url": base_url,
                "api_key": DEFAULT_API_KEY,
                "retries": 0,
                "max_requests_per_s": 100_000,
                "concurrency": 8,
            },
            "accounts": [{"username": u, "password": password_for(u)} for u in users],
        }
    )
    engine = db.make_engine(database_url)
    db.upgrade(engine)
    client = TraktClient(config.api)
    for name in ("first sync", "unchanged re-sync"):
        before = history_rows(engine)
        with counting(engine) as counter:
            Syncer(engine, config, client).run()
        written = history_rows(engine) - before
        n = len(users)
        print(
            f"{label:<10} {name:<18} {counter.statements / n:>10.2f} "
            f"{counter.seconds * 1000 / n:>10.3f} {written:>12}"
        )
    client.close()
    engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument(
        "--postgres",
        default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
        help="an admin URL; a scratch database is made and dropped",
    )
    args = parser.parse_args()
    configure_logging(format="json", level="error")
    users = usernames(args.accounts)
    print(f"{machine()}\n{args.accounts} accounts")
    print(
        f"{'database':<10} {'sync':<18} {'stmts/acct':>10} {'db ms/acct':>10} {'history rows':>12}"
    )
    with fake_api(args.accounts) as base_url:
        with scratch() as directory:
            measure("sqlite", f"sqlite:///{directory / 'bench.db'}", base_url, users)
        with postgres_database(args.postgres) as url:
            measure("postgresql", url, base_url, users)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
