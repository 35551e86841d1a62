"""What a SIGHUP reload puts in force: the schedule on the job, the rest from the next run, and
the settings that need a restart kept as they were (etl.daemon)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from etl.config import Config
from etl.daemon import SYNC_JOB, Daemon, split_reload
from tests.conftest import json_logs


def config_with(tmp_path: Path, **schedule: Any) -> Config:
    return Config.model_validate(
        {
            "database": {"url": f"sqlite:///{tmp_path / 'etl.db'}"},
            "schedule": {"interval": "10m", "jitter_s": 0, **schedule},
            "api": {"timeout_s": 10},
        }
    )


class Reloadable:
    """A daemon whose jobs are scheduled (paused: nothing runs) and whose next reload returns
    whatever config the test sets."""

    def __init__(self, config: Config) -> None:
        self.next = config
        self.daemon = Daemon(config, load_config=lambda: self.next, initial_run=False)
        self.daemon._schedule_jobs()
        self.daemon._scheduler.start(paused=True)

    def reload(self, config: Config) -> Config:
        self.next = config
        self.daemon._reload()
        return self.daemon._config

    def job(self) -> Any:
        return self.daemon._scheduler.get_job(SYNC_JOB)


@pytest.fixture
def reloadable(tmp_path: Path) -> Iterator[Reloadable]:
    built = Reloadable(config_with(tmp_path))
    yield built
    built.daemon._scheduler.shutdown(wait=False)
    built.daemon._engine.dispose()


def test_reload__changes_the_jobs_trigger_jitter_and_misfire_grace(
    reloadable: Reloadable, tmp_path: Path
) -> None:
    assert reloadable.job().misfire_grace_time == 600
    in_force = reloadable.reload(
        config_with(tmp_path, interval="2m", jitter_s=20, misfire_grace_s=45, run_timeout_s=90)
    )
    job = reloadable.job()
    assert job.trigger.interval.total_seconds() == 120
    assert job.trigger.jitter == 20
    assert job.misfire_grace_time == 45
    assert in_force.schedule.run_timeout_s == 90  # read by each run as it starts


def test_reload__an_unchanged_schedule_keeps_the_next_run_time(
    reloadable: Reloadable, tmp_path: Path
) -> None:
    """Rescheduling computes the next run afresh: a reload for an account must not delay it."""
    before = reloadable.job().next_run_time
    reloadable.reload(config_with(tmp_path).model_copy(update={"accounts": []}))
    assert reloadable.job().next_run_time == before


def test_reload__keys_that_need_a_restart_keep_their_values_with_a_warning(
    reloadable: Reloadable, tmp_path: Path
) -> None:
    other = config_with(
        tmp_path / "elsewhere", interval="5m", heartbeat_s=5, healthz_port=9000, run_timeout_s=60
    )
    with json_logs() as events:
        in_force = reloadable.reload(other)
    partial = [e for e in events if e["event"] == "config.reload_partial"]
    assert [(e["level"], e["keys"]) for e in partial] == [
        ("warning", ["database.url", "schedule.healthz_port", "schedule.heartbeat_s"])
    ]
    assert str(tmp_path / "elsewhere") not in in_force.database.url
    assert in_force.database.url == config_with(tmp_path).database.url
    assert (in_force.schedule.healthz_port, in_force.schedule.heartbeat_s) == (None, 15)
    # The rest of the new config applies.
    assert (in_force.schedule.interval, in_force.schedule.run_timeout_s) == ("5m", 60)
    assert reloadable.job().trigger.interval.total_seconds() == 300


def test_split_reload__nothing_kept_when_no_restart_key_changed(tmp_path: Path) -> None:
    old, new = config_with(tmp_path), config_with(tmp_path, interval="1h")
    assert split_reload(old, new) == (new, [])
