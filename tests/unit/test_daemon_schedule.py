"""How the daemon turns the schedule config into triggers, deadlines and grace times."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from etl.config import ScheduleConfig
from etl.daemon import misfire_grace_s, run_timeout_s, schedule_period_s, trigger_for


def test_interval__period_deadline_and_grace_default_to_the_interval() -> None:
    """An interval schedule's run deadline and misfire grace are the interval itself."""
    schedule = ScheduleConfig(interval="15m")
    assert schedule_period_s(schedule) == 900
    assert run_timeout_s(schedule) == 900
    assert misfire_grace_s(schedule) == 900


def test_cron__period_is_the_gap_between_firings() -> None:
    """A cron line's period is the time between two consecutive firings."""
    assert schedule_period_s(ScheduleConfig(cron="*/15 * * * *")) == 900
    assert schedule_period_s(ScheduleConfig(cron="0 3 * * *")) == 86_400


def test_explicit_deadline_and_grace__win_over_the_period() -> None:
    """run_timeout_s and misfire_grace_s, when given, are used as they are."""
    schedule = ScheduleConfig(interval="1h", run_timeout_s=600, misfire_grace_s=120)
    assert (run_timeout_s(schedule), misfire_grace_s(schedule)) == (600, 120)


@pytest.mark.parametrize(
    ("schedule", "gap_s"),
    [
        (ScheduleConfig(interval="2s", jitter_s=0), 2),
        (ScheduleConfig(interval="1h", jitter_s=0), 3600),
        (ScheduleConfig(cron="*/5 * * * *", jitter_s=0), 300),
    ],
)
def test_trigger__fires_at_the_configured_period(schedule: ScheduleConfig, gap_s: float) -> None:
    """Consecutive fire times of the trigger are one period apart."""
    trigger = trigger_for(schedule)
    now = datetime(2026, 12, 3, 12, 0, 1, tzinfo=UTC)
    first = trigger.get_next_fire_time(None, now)
    second = trigger.get_next_fire_time(first, first)
    assert (second - first).total_seconds() == gap_s


def test_trigger__jitter_is_capped_at_half_the_interval() -> None:
    """A 30 s default jitter on a 2 s interval would reorder runs; it is capped to 1 s."""
    trigger = trigger_for(ScheduleConfig(interval="2s", jitter_s=30))
    assert trigger.jitter == 1


def test_cron_trigger__keeps_its_jitter() -> None:
    """A cron schedule gets the configured jitter too (from_crontab alone would drop it)."""
    assert trigger_for(ScheduleConfig(cron="*/5 * * * *", jitter_s=30)).jitter == 30
