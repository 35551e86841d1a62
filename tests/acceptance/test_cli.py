"""The `trakt-etl` command as a user runs it: a subprocess, a YAML file, exit codes, JSON logs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import create_engine, inspect, text

from etl.fakeapi import DEFAULT_API_KEY, FakeTrakt, Fault, password_for, sha1_hex

pytestmark = pytest.mark.acceptance

CONTRACT_CHECK = Path(__file__).resolve().parents[3] / "shared" / "tools" / "contract_check.py"
TRAKT_ETL = [sys.executable, "-m", "etl"]


def run(
    args: Sequence[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TRAKT_ETL_")}
    environment.update(env or {})
    return subprocess.run(
        [*TRAKT_ETL, *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def base_config(fake: FakeTrakt, db_url: str, users: Sequence[str]) -> dict[str, Any]:
    return {
        "database": {"url": db_url},
        "api": {
            "base_url": fake.base_url,
            "api_key": DEFAULT_API_KEY,
            "timeout_s": 5,
            "max_requests_per_s": 10_000,
            "backoff_initial_s": 0.01,
            "backoff_max_s": 0.05,
        },
        "logging": {"format": "json"},
        "accounts": [{"username": u, "password": password_for(u)} for u in users],
    }


def events(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.strip()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_demo__runs_offline_and_prints_changes_and_current_rows(tmp_path: Path) -> None:
    """`trakt-etl demo` needs no network or credentials and shows diffs and current rows."""
    result = run(["demo"], cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert "Changes found by the second sync" in result.stdout
    for expected in (
        "location",
        "Los Angeles, CA",
        "removed",
        "profiles_current",
        "connections_current",
        "sharing_texts_current",
        "Now playing: [item]",
    ):
        assert expected in result.stdout
    engine = create_engine(f"sqlite:///{tmp_path / 'trakt_etl_demo.db'}")
    with engine.connect() as connection:
        changed = connection.execute(
            text("SELECT COUNT(*) FROM change_events WHERE run_id = 2")
        ).scalar_one()
        statuses = connection.execute(text("SELECT status FROM sync_runs")).scalars().all()
    engine.dispose()
    assert changed == 5
    assert statuses == ["success", "success"]


def test_sync__exit_0_and_contract_names_present(tmp_path: Path, fake_api: FakeTrakt) -> None:
    """A clean sync exits 0; its database and JSON log carry every name CONTRACT.md fixes."""
    users = fake_api.add_generated(3)
    db_url = f"sqlite:///{tmp_path / 'etl.db'}"
    config = write_config(tmp_path / "config.yaml", base_config(fake_api, db_url, users))
    fake_api.set_profile(users[0], pronouns="they")  # an unknown field: schema.drift

    first = run(["sync", "--config", str(config)], cwd=tmp_path)
    fake_api.set_profile(users[1], location="Elsewhere")
    second = run(["sync", "--config", str(config)], cwd=tmp_path)

    assert (first.returncode, second.returncode) == (0, 0), first.stderr + second.stderr
    names = [e["event"] for e in events(first.stderr)]
    assert names[0] == "run.started"
    assert names[-1] == "run.finished"
    assert names.count("account.synced") == 3
    assert "schema.drift" in names
    changed = [e for e in events(second.stderr) if e["event"] == "account.changed"]
    assert [(e["username"], e["changes"][0]["field"]) for e in changed] == [(users[1], "location")]
    if not CONTRACT_CHECK.exists():
        pytest.skip(f"{CONTRACT_CHECK} not found (shared/ is not beside the repo)")
    log = tmp_path / "sync.jsonl"
    log.write_text(first.stderr + second.stderr, encoding="utf-8")
    check = subprocess.run(
        [sys.executable, str(CONTRACT_CHECK), "--db", db_url, "--log", str(log)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout


def test_sync__exit_1_when_some_accounts_fail(tmp_path: Path, fake_api: FakeTrakt) -> None:
    """Failed accounts make `sync` exit 1 while the others commit."""
    users = fake_api.add_generated(4)
    fake_api.inject(users[0], Fault.http(401))
    fake_api.inject(users[1], Fault.invalid_json())
    fake_api.inject(users[2], Fault.html())
    db_url = f"sqlite:///{tmp_path / 'etl.db'}"
    config = write_config(tmp_path / "config.yaml", base_config(fake_api, db_url, users))

    result = run(["sync", "-c", str(config)], cwd=tmp_path)

    assert result.returncode == 1
    finished = next(e for e in events(result.stderr) if e["event"] == "run.finished")
    assert (finished["status"], finished["failed"], finished["succeeded"]) == ("partial", 3, 1)
    engine = create_engine(db_url)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT status FROM sync_runs")).scalar_one() == "partial"
        assert connection.execute(text("SELECT COUNT(*) FROM profiles_current")).scalar_one() == 1
    engine.dispose()


CONFIG_ERRORS = [
    pytest.param(
        lambda c: c["accounts"][1].update(password="${MISSING_PASSWORD}"),
        "accounts[1].password",
        "MISSING_PASSWORD",
        id="missing-env-var",
    ),
    pytest.param(
        lambda c: c["api"].update(timeot_s=3), "api.timeot_s", "unknown key", id="unknown-key"
    ),
    pytest.param(
        lambda c: c["accounts"].append({"username": c["accounts"][0]["username"], "password": "x"}),
        "accounts[2].username",
        "duplicate",
        id="duplicate-username",
    ),
    pytest.param(
        lambda c: c["api"].update(concurrency="many"), "api.concurrency", "integer", id="wrong-type"
    ),
    pytest.param(
        lambda c: c.update(schedule={"interval": "15 minutes"}),
        "schedule.interval",
        "unit",
        id="bad-interval",
    ),
]


@pytest.mark.parametrize(("spoil", "path", "words"), CONFIG_ERRORS)
def test_sync__config_error_exits_2_naming_the_key_before_any_work(
    tmp_path: Path, fake_api: FakeTrakt, spoil: Any, path: str, words: str
) -> None:
    """A bad config exits 2 with the key path, before touching the database or the API."""
    users = fake_api.add_generated(2)
    data = base_config(fake_api, f"sqlite:///{tmp_path / 'etl.db'}", users)
    spoil(data)
    config = write_config(tmp_path / "config.yaml", data)

    result = run(["sync", "-c", str(config)], cwd=tmp_path)

    assert result.returncode == 2
    error = events(result.stderr)[-1]
    assert error["event"] == "command.failed"
    assert path in error["error"]
    assert words in error["error"]
    assert not (tmp_path / "etl.db").exists()
    assert fake_api.request_count() == 0


def test_sync__exit_2_for_an_unknown_account_or_missing_config(
    tmp_path: Path, fake_api: FakeTrakt
) -> None:
    """Usage errors exit 2 too: an --account not in the config, or no config file at all."""
    users = fake_api.add_generated(1)
    config = write_config(
        tmp_path / "config.yaml", base_config(fake_api, f"sqlite:///{tmp_path / 'etl.db'}", users)
    )

    unknown = run(["sync", "-c", str(config), "--account", "nobody"], cwd=tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = run(["--log-format", "json", "sync"], cwd=empty)

    assert unknown.returncode == 2
    assert "nobody" in unknown.stderr
    assert missing.returncode == 2
    assert "config.yaml" in missing.stderr


def test_sync__exit_3_when_the_database_is_unreachable(tmp_path: Path, fake_api: FakeTrakt) -> None:
    """An unreachable database exits 3 without a password in the message."""
    users = fake_api.add_generated(1)
    db_url = f"postgresql+psycopg://etl:db-s3cret@127.0.0.1:{free_port()}/etl"
    config = write_config(tmp_path / "config.yaml", base_config(fake_api, db_url, users))

    result = run(["sync", "-c", str(config)], cwd=tmp_path)

    assert result.returncode == 3
    assert "unreachable" in result.stderr
    assert "db-s3cret" not in result.stderr
    assert fake_api.request_count() == 0


def test_no_secret_reaches_logs_or_tables(tmp_path: Path, fake_api: FakeTrakt) -> None:
    """Passwords, their SHA-1 and the api key appear in no log line and no table, even on errors."""
    users = fake_api.add_generated(4)
    api_key = "key-" + "k7Qx9Zp2" * 3
    fake_api.api_key = api_key
    fake_api.inject(users[1], Fault.http(500))
    fake_api.inject(users[2], Fault.html(status=502))
    db_url = f"sqlite:///{tmp_path / 'etl.db'}"
    data = base_config(fake_api, db_url, users)
    data["api"]["api_key"] = api_key
    data["accounts"][3] = {"username": users[3], "password_sha1": sha1_hex("wrong password")}
    config = write_config(tmp_path / "config.yaml", data)
    # A second config whose API is a closed port: requests then raises with the URL, key included.
    data["api"]["base_url"] = f"http://127.0.0.1:{free_port()}"
    unreachable = write_config(tmp_path / "unreachable.yaml", data)

    good = run(["--log-level", "debug", "sync", "-c", str(config)], cwd=tmp_path)
    bad = run(["--log-level", "debug", "sync", "-c", str(unreachable)], cwd=tmp_path)
    check = run(["config", "check", "-c", str(config)], cwd=tmp_path)

    assert (good.returncode, bad.returncode, check.returncode) == (1, 1, 0)
    failed = [e for e in events(bad.stderr) if e["event"] == "account.failed"]
    assert {e["error_kind"] for e in failed} == {"connection"}
    assert "***" in failed[0]["error"]  # the URL was there, its key masked
    secrets = {api_key, sha1_hex("wrong password")}
    for user in users:
        secrets |= {password_for(user), sha1_hex(password_for(user))}
    engine = create_engine(db_url)
    dump = []
    with engine.connect() as connection:
        for table in inspect(engine).get_table_names():
            dump += [repr(tuple(r)) for r in connection.execute(text(f"SELECT * FROM {table}"))]
    engine.dispose()
    everything = "\n".join(
        [good.stdout, good.stderr, bad.stdout, bad.stderr, check.stdout, check.stderr, *dump]
    )
    assert dump, "the tables should hold the synced rows"
    leaked = [secret for secret in secrets if secret in everything]
    assert leaked == []


def test_db_upgrade_and_current(tmp_path: Path) -> None:
    """`db upgrade` migrates an empty database to head; `db current` says so."""
    db_url = f"sqlite:///{tmp_path / 'etl.db'}"
    config = write_config(tmp_path / "config.yaml", {"database": {"url": db_url}})

    before = run(["db", "current", "-c", str(config)], cwd=tmp_path)
    upgraded = run(["db", "upgrade", "-c", str(config)], cwd=tmp_path)
    after = run(["db", "current", "-c", str(config)], cwd=tmp_path)

    assert before.returncode == upgraded.returncode == after.returncode == 0
    assert before.stdout.startswith("empty")
    assert "up to date" in after.stdout
    engine = create_engine(db_url)
    assert {"profile_history", "accounts"} <= set(inspect(engine).get_table_names())
    assert "profiles_current" in inspect(engine).get_view_names()
    engine.dispose()


def test_sync_without_auto_migrate__refuses_an_old_schema(
    tmp_path: Path, fake_api: FakeTrakt
) -> None:
    """With auto_migrate off, a sync against an unmigrated database exits 3 and says what to do."""
    users = fake_api.add_generated(1)
    data = base_config(fake_api, f"sqlite:///{tmp_path / 'etl.db'}", users)
    data["database"]["auto_migrate"] = False
    config = write_config(tmp_path / "config.yaml", data)

    result = run(["sync", "-c", str(config)], cwd=tmp_path)

    assert result.returncode == 3
    assert "trakt-etl db upgrade" in result.stderr
    assert fake_api.request_count() == 0


def test_config_check__prints_resolved_config_with_secrets_masked(tmp_path: Path) -> None:
    """`config check` resolves ${VAR} and prints the config with every secret masked."""
    config = tmp_path / "config.yaml"
    config.write_text(
        "api:\n  api_key: ${KEY}\naccounts:\n  - username: justin\n    password: ${PW}\n",
        encoding="utf-8",
    )

    result = run(
        ["config", "check"],
        cwd=tmp_path,
        env={"KEY": "the-api-key", "PW": "hunter22", "TRAKT_ETL_CONFIG": str(config)},
    )

    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["api"]["api_key"] == "***"
    assert shown["accounts"][0] == {**shown["accounts"][0], "username": "justin", "password": "***"}
    assert shown["api"]["timeout_s"] == 10  # defaults are resolved too
    assert "hunter22" not in result.stdout + result.stderr
    assert "the-api-key" not in result.stdout + result.stderr


def test_console_script_is_the_same_program(tmp_path: Path) -> None:
    """The installed `trakt-etl` script and `python -m etl` answer alike."""
    script = Path(sys.executable).with_name("trakt-etl")
    if not script.exists():
        pytest.skip("trakt-etl is not installed beside this interpreter")
    by_script = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, check=False
    )
    by_module = run(["--version"], cwd=tmp_path)
    assert by_script.returncode == by_module.returncode == 0
    assert by_script.stdout == by_module.stdout
    assert by_script.stdout.startswith("trakt-etl ")
