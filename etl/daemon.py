"""`trakt-etl daemon`: syncs on a schedule until told to stop, for months, unattended.

APScheduler 3 fires the runs (interval or cron, with jitter); at most one runs at a time, late
firings are coalesced, and a firing later than the misfire grace is skipped with a warning. Each
run has a deadline: when it passes, the run stops claiming accounts, abandons fetches in flight,
has its statements still going in the database cancelled, and is closed `aborted`, so a hung
request or lock cannot block the schedule. SIGTERM/SIGINT stop the daemon the same way and exit
0; SIGHUP reloads the config (an invalid one is logged and the old one kept; settings that need
a restart are kept, with a warning). A heartbeat job proves the scheduler alive, in the
`workers` table and on the optional /healthz.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from types import FrameType
from typing import Any

import structlog
from apscheduler.events import (  # type: ignore[import-untyped]
    EVENT_JOB_ERROR,
    EVENT_JOB_MAX_INSTANCES,
    EVENT_JOB_MISSED,
    JobEvent,
)
from apscheduler.schedulers.background import BackgroundScheduler  # type: ignore[import-untyped]
from apscheduler.triggers.cron import CronTrigger  # type: ignore[import-untyped]
from apscheduler.triggers.interval import IntervalTrigger  # type: ignore[import-untyped]
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from etl import db, liveness
from etl.client import TraktClient
from etl.config import Config, ScheduleConfig
from etl.control import DatabaseWatchdog, shutdown_bound_s
from etl.errors import ConfigError, ExitCode, TraktEtlError
from etl.health import HealthServer
from etl.ratelimit import RequestGate
from etl.redact import Redactor
from etl.sync import RunControl, Syncer, utc_now

log = structlog.get_logger("etl.daemon")

ConfigLoader = Callable[[], Config]
SYNC_JOB = "sync"
HEARTBEAT_JOB = "heartbeat"
# Settings a running daemon cannot take from a reload: the database its lock, worker row and
# runs live in, the port it listens on, the heartbeat other workers judge it by.
RESTART_KEYS: tuple[tuple[str, str], ...] = (
    ("database", "url"),
    ("schedule", "healthz_host"),
    ("schedule", "healthz_port"),
    ("schedule", "heartbeat_s"),
)


def trigger_for(schedule: ScheduleConfig) -> Any:
    """The APScheduler trigger for the schedule; jitter is capped at half an interval."""
    period = schedule_period_s(schedule)
    jitter = min(schedule.jitter_s, period / 2) or None
    if schedule.cron is not None:
        trigger = CronTrigger.from_crontab(schedule.cron, timezone=UTC)
        trigger.jitter = jitter  # from_crontab takes no jitter; the trigger reads the attribute
        return trigger
    return IntervalTrigger(seconds=schedule.interval_seconds, timezone=UTC, jitter=jitter)


def schedule_period_s(schedule: ScheduleConfig) -> float:
    """Seconds between two runs: the interval, or the gap between a cron line's next firings."""
    return schedule.period_s()


def _trigger_settings(schedule: ScheduleConfig) -> tuple[str | None, str | None, float]:
    """What `trigger_for` is made of."""
    return schedule.interval, schedule.cron, schedule.jitter_s


def _grace_time(schedule: ScheduleConfig) -> int:
    """APScheduler's misfire_grace_time: whole seconds, at least one."""
    return max(1, round(misfire_grace_s(schedule)))


def run_timeout_s(schedule: ScheduleConfig) -> float:
    return schedule.run_timeout_s or schedule_period_s(schedule)


def misfire_grace_s(schedule: ScheduleConfig) -> float:
    return schedule.misfire_grace_s or schedule_period_s(schedule)


def _sleep_unless_stopped(control: RunControl, seconds: float) -> None:
    """Retry backoffs end at once when the run is stopped."""
    control.stop.wait(seconds)


def split_reload(old: Config, new: Config) -> tuple[Config, list[str]]:
    """The config a reload puts in force, and the changed keys that need a restart: those keep
    their old values (`RESTART_KEYS`); everything else applies from the next run."""
    kept: list[str] = []
    sections: dict[str, Any] = {}
    for section, key in RESTART_KEYS:
        before, after = getattr(old, section), getattr(new, section)
        if getattr(before, key) != getattr(after, key):
            kept.append(f"{section}.{key}")
            current = sections.get(section, after)
            sections[section] = current.model_copy(update={key: getattr(before, key)})
    return (new.model_copy(update=sections) if sections else new), kept


class Daemon:
    """The long-running process; `serve()` blocks until a stop signal and returns the exit code."""

    def __init__(
        self,
        config: Config,
        *,
        load_config: ConfigLoader,
        on_reload: Callable[[Config], None] = lambda _config: None,
        initial_run: bool = True,
        clock: Callable[[], datetime] = utc_now,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._load_config = load_config
        self._on_reload = on_reload
        self._initial_run = initial_run
        self._clock = clock
        self._monotonic = monotonic
        self._engine: Engine = db.make_engine(config.database.url)
        self._stopping = threading.Event()
        self._reload_requested = threading.Event()
        self._lock = threading.Lock()
        self._current: RunControl | None = None
        self._idle = threading.Event()
        self._idle.set()
        self._last_tick = monotonic()
        self._worker_id: int | None = None
        self._scheduler = BackgroundScheduler(timezone=UTC)
        # Its skipped/missed warnings are logged by our listener, with reasons; keep its errors.
        logging.getLogger("apscheduler").setLevel(logging.ERROR)
        self._health: HealthServer | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    def serve(self) -> ExitCode:
        self._install_signal_handlers()
        self._register()
        self._schedule_jobs()
        self._scheduler.start()
        self._start_health()
        schedule = self._config.schedule
        log.info(
            "daemon.started",
            worker_id=self._worker_id,
            interval=schedule.interval,
            cron=schedule.cron,
            run_timeout_s=run_timeout_s(schedule),
            accounts=len(self._config.enabled_accounts()),
            healthz_port=self._health.port if self._health else None,
        )
        while not self._stopping.wait(0.2):
            if self._reload_requested.is_set():
                self._reload_requested.clear()
                self._reload()
        self._shutdown()
        return ExitCode.OK

    def request_stop(self, reason: str) -> None:
        """Stop claiming accounts, let the account being written commit, close the run, exit."""
        with self._lock:
            current = self._current
        if current is not None:
            current.request_stop(f"stopped by {reason}")
        self._stopping.set()

    def _install_signal_handlers(self) -> None:
        def stop(signum: int, _frame: FrameType | None) -> None:
            self.request_stop(signal.Signals(signum).name)

        def reload(_signum: int, _frame: FrameType | None) -> None:
            self._reload_requested.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reload)

    def _shutdown(self) -> None:
        log.info("daemon.stopping", run_in_progress=not self._idle.is_set())
        self._scheduler.shutdown(wait=False)
        # The run's watchdog cancels what is stuck in the database half-way through the bound.
        bound = shutdown_bound_s(self._config.api.timeout_s)
        if not self._idle.wait(bound):
            log.error("daemon.stop_timeout", waited_s=bound)
        if self._health:
            self._health.stop()
        if self._worker_id is not None:
            try:
                with self._engine.begin() as connection:
                    liveness.retire_worker(connection, self._worker_id, self._clock())
            except SQLAlchemyError as exc:
                log.warning("daemon.retire_failed", error=str(getattr(exc, "orig", exc)))
        self._engine.dispose()
        log.info("daemon.stopped")

    # --- scheduling ----------------------------------------------------------------------------

    def _schedule_jobs(self) -> None:
        schedule = self._config.schedule
        self._scheduler.add_listener(
            self._on_scheduler_event, EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES | EVENT_JOB_ERROR
        )
        # Without next_run_time the trigger decides the first run (None would mean "paused").
        first: dict[str, Any] = {"next_run_time": datetime.now(UTC)} if self._initial_run else {}
        self._scheduler.add_job(
            self._run_job,
            trigger_for(schedule),
            id=SYNC_JOB,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=_grace_time(schedule),
            **first,
        )
        heartbeat = schedule.heartbeat_s
        self._scheduler.add_job(
            self._tick,
            IntervalTrigger(seconds=heartbeat, timezone=UTC),
            id=HEARTBEAT_JOB,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=max(1, round(heartbeat)),
        )

    def _on_scheduler_event(self, event: JobEvent) -> None:
        if event.job_id != SYNC_JOB:
            if event.code == EVENT_JOB_ERROR:
                log.error("scheduler.job_failed", job=event.job_id, error=str(event.exception))
            return
        if event.code == EVENT_JOB_MISSED:
            log.warning(
                "run.missed",
                scheduled_for=event.scheduled_run_time.isoformat(),
                reason="it would have started later than the misfire grace allows",
            )
        elif event.code == EVENT_JOB_MAX_INSTANCES:
            # A JobSubmissionEvent: it carries a list of run times, not one.
            log.warning(
                "run.skipped",
                scheduled_for=[t.isoformat() for t in event.scheduled_run_times],
                reason="the previous run is still going",
            )
        elif event.code == EVENT_JOB_ERROR:
            log.error("run.crashed", error=str(event.exception))

    def _tick(self) -> None:
        """The heartbeat: proves the scheduler fires jobs, and says so in the database."""
        self._last_tick = self._monotonic()
        if self._worker_id is None and not self._register():
            return
        assert self._worker_id is not None
        try:
            heartbeat_s = self._config.schedule.heartbeat_s
            with self._engine.begin() as connection:
                liveness.beat(
                    connection,
                    self._worker_id,
                    self._clock(),
                    lease_s=liveness.stale_after(heartbeat_s),
                )
        except SQLAlchemyError as exc:
            log.warning("heartbeat.failed", error=str(getattr(exc, "orig", exc)))

    def _register(self) -> bool:
        """Record this process in `workers` and close runs that died; False if the DB is down."""
        try:
            db.check_reachable(self._engine)
            db.ensure_schema(self._engine, auto_migrate=self._config.database.auto_migrate)
            with self._engine.begin() as connection:
                now = self._clock()
                self._worker_id = liveness.register_worker(connection, kind="daemon", now=now)
                stale = liveness.stale_after(self._config.schedule.heartbeat_s)
                liveness.abort_dead(connection, now, stale_after_s=stale)
        except TraktEtlError as exc:
            log.error("daemon.database_unavailable", error=str(exc))
            return False
        except SQLAlchemyError as exc:
            log.error("daemon.database_unavailable", error=str(getattr(exc, "orig", exc)))
            return False
        return True

    # --- one run -------------------------------------------------------------------------------

    def _run_job(self) -> None:
        if self._stopping.is_set():
            return
        config = self._config
        control = RunControl(deadline_s=run_timeout_s(config.schedule))
        with self._lock:
            self._current = control
            self._idle.clear()
        client = TraktClient(
            config.api,
            gate=RequestGate(config.api.max_requests_per_s, stop=control.stop),
            redactor=Redactor(config.global_secrets()),
            sleep=lambda seconds: _sleep_unless_stopped(control, seconds),
        )
        try:
            with (
                db.track_run_connections(self._engine) as connections,
                DatabaseWatchdog(
                    control,
                    connections.cancel,
                    stop_grace_s=shutdown_bound_s(config.api.timeout_s) / 2,
                ),
            ):
                self._sync(config, control, client)
        except TraktEtlError as exc:
            # The database went away, say: this run is lost, the schedule goes on.
            log.error("run.failed", error=str(exc))
        except Exception:
            log.exception("run.crashed")
        finally:
            client.close()
            with self._lock:
                self._current = None
                self._idle.set()

    def _sync(self, config: Config, control: RunControl, client: TraktClient) -> None:
        """One run, its database statements tracked so that the watchdog can cancel them."""
        if self._worker_id is None and not self._register():
            log.error("run.failed", error="the database is unavailable; trying next time")
            return
        db.ensure_schema(self._engine, auto_migrate=config.database.auto_migrate)
        syncer = Syncer(
            self._engine,
            config,
            client,
            clock=self._clock,
            control=control,
            worker_id=self._worker_id,
            stale_after_s=liveness.stale_after(config.schedule.heartbeat_s),
        )
        syncer.run(trigger="schedule")

    # --- reload and health ---------------------------------------------------------------------

    def _reload(self) -> None:
        """Accounts, api settings, the run timeout apply from the next run (each run reads the
        config it starts with); the trigger and misfire grace are changed on the job here."""
        try:
            loaded = self._load_config()
        except ConfigError as exc:
            log.error("config.reload_failed", error=str(exc), kept="the previous config")
            return
        old = self._config
        config, kept = split_reload(old, loaded)
        self._config = config
        self._on_reload(config)
        if kept:
            log.warning(
                "config.reload_partial",
                keys=kept,
                kept="the running values, until the daemon is restarted",
            )
        before, after = old.schedule, config.schedule
        if _trigger_settings(before) != _trigger_settings(after):
            # Only on a change: rescheduling computes the next run time afresh.
            self._scheduler.reschedule_job(SYNC_JOB, trigger=trigger_for(after))
        if misfire_grace_s(before) != misfire_grace_s(after):
            self._scheduler.modify_job(SYNC_JOB, misfire_grace_time=_grace_time(after))
        log.info(
            "config.reloaded",
            accounts=len(config.enabled_accounts()),
            schedule_changed=before != after,
            run_timeout_s=run_timeout_s(after),
            misfire_grace_s=misfire_grace_s(after),
        )

    def _start_health(self) -> None:
        schedule = self._config.schedule
        if schedule.healthz_port is None:
            return
        self._health = HealthServer(schedule.healthz_host, schedule.healthz_port, self.health)
        self._health.start()

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Healthy while the heartbeat job fires and no run overstays its deadline."""
        schedule = self._config.schedule
        now = self._monotonic()
        age = now - self._last_tick
        with self._lock:
            current = self._current
        overdue = (
            current is not None
            and current.deadline is not None
            and now > current.deadline + 2 * schedule.heartbeat_s
        )
        healthy = age < 3 * schedule.heartbeat_s and not overdue and not self._stopping.is_set()
        return healthy, {
            "heartbeat_age_s": round(age, 1),
            "run_in_progress": current is not None,
            "run_overdue": overdue,
            "worker_id": self._worker_id,
        }
