"""The floors a sync is measured against: the least this machine does with the same libraries.

    python -m benchmarks.floors fetch  BASE_URL N CONCURRENCY
    python -m benchmarks.floors insert DATABASE_URL N

- fetch (floor a): POST the same N account/settings requests with `requests`, on CONCURRENCY
  threads with a keep-alive session each, and decode each JSON answer; nothing else.
- insert (floor b): `executemany` of the same normalized rows (profile, connection and sharing
  text rows of the N accounts, as the fake API serves them) into empty history tables, with
  SQLAlchemy Core as the sync uses it. Making the rows is not timed; the printed line is.

Each runs as its own process, so the benchmark measures it from outside like a sync. `insert`
prints the CPU and wall seconds of the inserting alone (the setup is excluded).
"""

from __future__ import annotations

import sys
import threading
import time
from datetime import UTC, datetime


def fetch(base_url: str, count: int, concurrency: int) -> None:
    import requests

    from etl.fakeapi import DEFAULT_API_KEY, password_for, sha1_hex

    url = f"{base_url}/account/settings/{DEFAULT_API_KEY}"
    numbers = iter(range(1, count + 1))
    taking = threading.Lock()

    def work() -> None:
        # Each thread takes the next account as it is free: no queue of N futures, so the
        # floor's own cost per account does not grow with N.
        with requests.Session() as session:
            while True:
                with taking:
                    number = next(numbers, None)
                if number is None:
                    return
                username = f"user{number:05d}"
                body = {"username": username, "password": sha1_hex(password_for(username))}
                session.post(url, json=body, timeout=30).json()

    threads = [threading.Thread(target=work) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def insert(database_url: str, count: int) -> None:
    from sqlalchemy import insert as insert_into

    from etl import db, models
    from etl.fakeapi import sample_settings
    from etl.normalize import from_v1

    engine = db.make_engine(database_url)
    models.metadata.create_all(engine)
    now = datetime.now(UTC)
    tables: dict[str, list[dict[str, object]]] = {"profile": [], "connection": [], "sharing": []}
    with engine.begin() as connection:
        connection.execute(
            insert_into(models.accounts),
            [
                {"username": f"user{n:05d}", "api_version": 1, "enabled": True}
                | {"first_seen_at": now}
                for n in range(1, count + 1)
            ],
        )
        run = connection.execute(
            insert_into(models.sync_runs).values(started_at=now, status="running", trigger="manual")
        ).inserted_primary_key[0]
    base = {"run_id": run, "valid_from": now, "valid_to": None}
    for number in range(1, count + 1):
        username = f"user{number:05d}"
        snapshot = from_v1({"status": "success", **sample_settings(username, number - 1)})
        common = {**base, "account_id": number}
        tables["profile"].append(
            {**common, "row_hash": snapshot.profile.digest, **snapshot.profile.values}
        )
        tables["connection"] += [
            {**common, "network": row.key, "row_hash": row.digest, **row.values}
            for row in snapshot.connections
        ]
        tables["sharing"] += [
            {**common, "action": row.key, "row_hash": row.digest, **row.values}
            for row in snapshot.sharing_texts
        ]
    targets = {
        "profile": models.profile_history,
        "connection": models.connection_history,
        "sharing": models.sharing_text_history,
    }
    cpu, wall = time.process_time(), time.perf_counter()
    with engine.begin() as connection:
        for name, rows in tables.items():
            connection.execute(insert_into(targets[name]), rows)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    rows_written = sum(len(rows) for rows in tables.values())
    print(f"{cpu:.6f} {wall:.6f} {rows_written}")
    engine.dispose()


def main(argv: list[str]) -> int:
    if argv[:1] == ["fetch"]:
        fetch(argv[1], int(argv[2]), int(argv[3]))
    elif argv[:1] == ["insert"]:
        insert(argv[1], int(argv[2]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
