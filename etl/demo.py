"""`trakt-etl demo`: the whole product in one command, with no network and no credentials.

Starts the bundled fake trakt API on a free loopback port, syncs five sample accounts into a fresh
SQLite file, changes some of their settings on the fake, syncs again, and prints what changed and
what is current, read back from the tables people query.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table
from rich.text import Text
from sqlalchemy import Engine, text

from etl import db
from etl.client import TraktClient
from etl.config import Config
from etl.errors import ExitCode
from etl.fakeapi import DEFAULT_API_KEY, FakeTrakt, password_for
from etl.redact import Redactor
from etl.sync import RunSummary, Syncer

DEMO_USERS = ("justin", "sean", "lara", "mia", "omar")


def demo_config(base_url: str, database_url: str) -> Config:
    return Config.model_validate(
        {
            "database": {"url": database_url, "auto_migrate": True},
            # The fake API is on this machine: no need for the production pace.
            "api": {"base_url": base_url, "api_key": DEFAULT_API_KEY, "max_requests_per_s": 1000},
            "accounts": [{"username": u, "password": password_for(u)} for u in DEMO_USERS],
        }
    )


def change_some_settings(fake: FakeTrakt) -> None:
    """What happens between two syncs: a profile edit, a flag, a lost network, a new text."""
    fake.set_profile("justin", location="Los Angeles, CA")
    mode = fake.settings("sean")["viewing"]["ratings"]["mode"]
    fake.set_viewing("sean", ratings_mode="simple" if mode == "advanced" else "advanced")
    share_tv = fake.settings("lara")["connections"]["twitter"]["share_tv"]
    fake.set_connection("lara", "twitter", share_tv=not share_tv)
    fake.remove_network("mia", "facebook")
    fake.set_sharing_text("omar", "watching", "Now playing: [item]")


def run_demo(path: str, out: TextIO) -> ExitCode:
    database = Path(path)
    for leftover in (database, Path(f"{path}-wal"), Path(f"{path}-shm")):
        leftover.unlink(missing_ok=True)
    console = Console(file=out, width=None if out.isatty() else 120)
    with FakeTrakt() as fake:
        for username in DEMO_USERS:
            fake.add_account(username)
        config = demo_config(fake.base_url, f"sqlite:///{database}")
        engine = db.make_engine(config.database.url)
        db.upgrade(engine)
        client = TraktClient(config.api, redactor=Redactor(config.global_secrets()))
        try:
            syncer = Syncer(engine, config, client)
            first = syncer.run()
            console.print(f"[bold]First sync[/]: {_summary(first)}")
            change_some_settings(fake)
            second = syncer.run()
            console.print(f"[bold]Second sync[/] after changing settings: {_summary(second)}\n")
            _print_changes(console, engine, second.run_id)
            _print_current(console, engine)
        finally:
            client.close()
            engine.dispose()
    console.print(
        f"\nThe tables are in {database}; try:\n"
        f"  sqlite3 {database} 'SELECT username, location, ratings_mode FROM profiles_current'"
    )
    return ExitCode.OK


def _summary(run: RunSummary) -> str:
    c = run.counts
    return (
        f"run {run.run_id} {run.status}: {c.succeeded}/{c.total} accounts synced, "
        f"{c.changed} changed, {run.duration_ms} ms"
    )


def _rows(engine: Engine, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(text(sql), params)]


def _table(title: str, headers: tuple[str, ...], rows: list[tuple[Any, ...]]) -> Table:
    table = Table(title=title, title_justify="left")
    for header in headers:
        table.add_column(header)
    for row in rows:
        # Text, not markup: sharing texts hold "[item]", which rich would read as a style tag.
        table.add_row(*(Text("" if v is None else str(v)) for v in row))
    return table


def _compact(value: str | None) -> str | None:
    """A JSON value as short text: whole rows are summarized by their keys."""
    if value is None:
        return None
    decoded = json.loads(value)
    if isinstance(decoded, dict):
        return "{" + ", ".join(f"{k}={v}" for k, v in decoded.items() if v is not None) + "}"
    return json.dumps(decoded, ensure_ascii=False)


def _print_changes(console: Console, engine: Engine, run_id: int) -> None:
    rows = _rows(
        engine,
        "SELECT a.username, e.entity, e.entity_key, e.field, e.change, e.old_value, e.new_value "
        "FROM change_events e JOIN accounts a ON a.id = e.account_id "
        "WHERE e.run_id = :run_id ORDER BY e.id",
        run_id=run_id,
    )
    shown = [(*row[:5], _compact(row[5]), _compact(row[6])) for row in rows]
    console.print(
        _table(
            "Changes found by the second sync (change_events)",
            ("username", "entity", "key", "field", "change", "old", "new"),
            shown,
        )
    )


def _print_current(console: Console, engine: Engine) -> None:
    console.print(
        _table(
            "profiles_current",
            ("username", "full_name", "location", "ratings_mode", "vip", "valid_from"),
            _rows(
                engine,
                "SELECT username, full_name, location, ratings_mode, vip, valid_from "
                "FROM profiles_current ORDER BY username",
            ),
        )
    )
    console.print(
        _table(
            "connections_current",
            ("username", "network", "connected", "share_tv", "share_movies", "share_ratings"),
            _rows(
                engine,
                "SELECT username, network, connected, share_tv, share_movies, "
                "share_ratings FROM connections_current ORDER BY username, network",
            ),
        )
    )
    console.print(
        _table(
            "sharing_texts_current",
            ("username", "action", "text"),
            _rows(
                engine,
                "SELECT username, action, text FROM sharing_texts_current "
                "ORDER BY username, action",
            ),
        )
    )
