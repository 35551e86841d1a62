"""Shared fixtures: a clean environment, the fake trakt API, and real databases.

Databases: SQLite in a temporary file always; PostgreSQL (127.0.0.1:5432, database per test)
when the server answers. Locally an absent server skips those tests with the reason; with
TRAKT_ETL_REQUIRE_SERVERS=1 (set by .ci/run) an absent server fails them instead.
"""

from __future__ import annotations

import io
import json
import os
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import OperationalError

from etl import db
from etl.config import Config
from etl.fakeapi import DEFAULT_API_KEY, FakeTrakt, password_for
from etl.logs import configure_logging

POSTGRES_ADMIN_URL = os.environ.get(
    "TRAKT_ETL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
MARIADB_ADMIN_URL = os.environ.get(
    "TRAKT_ETL_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test?charset=utf8mb4"
)
REQUIRE_SERVERS = os.environ.get("TRAKT_ETL_REQUIRE_SERVERS") == "1"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The developer's TRAKT_ETL_* variables must not change a test's outcome."""
    for name in list(os.environ):
        if name.startswith("TRAKT_ETL_") and name not in (
            "TRAKT_ETL_REQUIRE_SERVERS",
            "TRAKT_ETL_TEST_POSTGRES_URL",
            "TRAKT_ETL_TEST_MARIADB_URL",
        ):
            monkeypatch.delenv(name)
    configure_logging(format="json", level="debug")
    yield
    structlog.contextvars.clear_contextvars()


@contextmanager
def json_logs(level: str = "debug") -> Iterator[list[dict[str, Any]]]:
    """Collect what the real logging pipeline writes, parsed; filled when the block ends."""
    stream = io.StringIO()
    events: list[dict[str, Any]] = []
    configure_logging(format="json", level=level, stream=stream)
    try:
        yield events
    finally:
        events.extend(json.loads(line) for line in stream.getvalue().splitlines() if line)
        configure_logging(format="json", level="debug")


@pytest.fixture
def fake_api() -> Iterator[FakeTrakt]:
    with FakeTrakt() as fake:
        yield fake


def _server_missing(what: str, error: Exception) -> None:
    reason = f"{what} is not reachable ({type(error).__name__}); start it to run these tests"
    if REQUIRE_SERVERS:
        pytest.fail(f"{reason} — TRAKT_ETL_REQUIRE_SERVERS=1 makes this a failure")
    pytest.skip(reason)


def _postgres_database() -> Iterator[str]:
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"trakt_etl_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as exc:
        admin.dispose()
        _server_missing("PostgreSQL", exc)
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _mariadb_database() -> Iterator[str]:
    admin = create_engine(MARIADB_ADMIN_URL)
    name = f"trakt_etl_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.begin() as connection:
            connection.execute(
                text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
            )
    except OperationalError as exc:
        admin.dispose()
        _server_missing("MariaDB", exc)
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        admin.dispose()


@pytest.fixture
def mariadb_url() -> Iterator[str]:
    """A fresh, empty MariaDB database (utf8mb4), dropped afterwards."""
    yield from _mariadb_database()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database, dropped afterwards."""
    yield from _postgres_database()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'trakt_etl.db'}"


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgresql", marks=pytest.mark.postgres),
        pytest.param("mariadb", marks=pytest.mark.mariadb),
    ]
)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of each supported kind, in turn."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'trakt_etl.db'}"
    elif request.param == "postgresql":
        yield from _postgres_database()
    else:
        yield from _mariadb_database()


@pytest.fixture
def sqlite_engine(sqlite_url: str) -> Iterator[Engine]:
    """An engine on a migrated, empty SQLite file, for tests whose point is not the database."""
    engine = db.make_engine(sqlite_url)
    db.upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """An engine on a migrated, empty database."""
    engine = db.make_engine(database_url)
    db.upgrade(engine)
    yield engine
    engine.dispose()


ConfigFactory = Callable[..., Config]


def config_factory(fake: FakeTrakt, database_url: str) -> ConfigFactory:
    """Build a Config for some usernames of the fake API (api overrides as keyword arguments)."""

    def build(usernames: list[str], **api: Any) -> Config:
        return Config.model_validate(
            {
                "database": {"url": database_url},
                "api": {
                    "base_url": fake.base_url,
                    "api_key": DEFAULT_API_KEY,
                    # The fake is local: no need for the polite production pace.
                    "max_requests_per_s": 10_000,
                    "backoff_initial_s": 0.01,
                    "backoff_max_s": 0.05,
                    **api,
                },
                "accounts": [{"username": u, "password": password_for(u)} for u in usernames],
            }
        )

    return build


@pytest.fixture
def make_config(fake_api: FakeTrakt, database_url: str) -> ConfigFactory:
    """Configs for the database of the test's `database_url` (each supported kind in turn)."""
    return config_factory(fake_api, database_url)


@pytest.fixture
def sqlite_config(fake_api: FakeTrakt, sqlite_url: str) -> ConfigFactory:
    """Configs for a SQLite file, for tests whose point is not the database."""
    return config_factory(fake_api, sqlite_url)


def fetch_processes_of(pid: int) -> list[int]:
    """The fetch processes (`python -m etl.fetchprocs`) among the children of process `pid`."""
    found = []
    for thread in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = (thread / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            try:
                if b"etl.fetchprocs" in Path(f"/proc/{child}/cmdline").read_bytes():
                    found.append(int(child))
            except OSError:
                continue
    return found



@contextmanager
def engine_for(url: str) -> Iterator[Engine]:
    """An engine made as trakt-etl makes it, disposed afterwards."""
    engine = db.make_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


def healthz(port: int, path: str = "/healthz") -> tuple[int, dict[str, Any]]:
    """GET the daemon's health endpoint: the status and the JSON body."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())
