"""The `trakt-etl` command line: parses arguments, wires the pieces, maps errors to exit codes.

This is the only module that knows everything, and the only place where an error becomes a
message and an exit status (`ExitCode`, CONTRACT.md "Command line").

Environment: TRAKT_ETL_CONFIG (config path), TRAKT_ETL_DATABASE_URL (overrides database.url).
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import TYPE_CHECKING

import structlog
import yaml
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from etl import __version__, db, liveness
from etl.client import TraktClient
from etl.config import Config, load_config, resolve_config_path
from etl.control import DatabaseWatchdog, shutdown_bound_s
from etl.dblock import ProcessLock, lock_path_for
from etl.errors import DatabaseError, ExitCode, TraktEtlError, exit_code_for
from etl.logs import LEVELS, choose_format, configure_logging
from etl.ratelimit import RequestGate
from etl.redact import Redactor
from etl.runs import RunStatus
from etl.sync import RunControl, Syncer, utc_now

if TYPE_CHECKING:
    from etl import report

log = structlog.get_logger("etl.cli")

Command = Callable[[argparse.Namespace], ExitCode]


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """Options every command takes, before or after the command name."""
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "-c",
        "--config",
        metavar="PATH",
        default=default,
        help="config file (default: $TRAKT_ETL_CONFIG, else ./config.yaml)",
    )
    parser.add_argument(
        "--log-format",
        choices=("json", "console"),
        default=default,
        help="log format (default: logging.format, else console on a terminal)",
    )
    parser.add_argument(
        "--log-level",
        choices=LEVELS,
        type=str.lower,
        default=default,
        help="log level (default: logging.level, else info)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trakt-etl",
        description="Keep a SQL copy of trakt.tv account settings, with full history and diffs.",
        epilog="Environment: TRAKT_ETL_CONFIG is the config path; TRAKT_ETL_DATABASE_URL "
        "overrides database.url.",
    )
    parser.add_argument("--version", action="version", version=f"trakt-etl {__version__}")
    _global_options(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, suppress=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sync = commands.add_parser("sync", parents=[common], help="one run now, then exit (cron)")
    sync.add_argument(
        "--account", action="append", metavar="USER", help="sync only this account (repeatable)"
    )
    sync.add_argument(
        "--wait",
        action="store_true",
        help="on SQLite, wait for another trakt-etl process instead of refusing",
    )
    sync.set_defaults(handler=cmd_sync)

    daemon = commands.add_parser(
        "daemon", parents=[common], help="sync on the schedule until SIGTERM/SIGINT"
    )
    daemon.add_argument(
        "--no-initial-run", action="store_true", help="wait for the schedule instead of syncing now"
    )
    daemon.add_argument(
        "--wait",
        action="store_true",
        help="on SQLite, wait for another trakt-etl process instead of refusing",
    )
    daemon.set_defaults(handler=cmd_daemon)

    status = commands.add_parser(
        "status", parents=[common], help="recent runs, failing accounts, daemon heartbeats"
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--runs", type=int, default=10, metavar="N", help="runs to show (10)")
    status.set_defaults(handler=cmd_status)

    history = commands.add_parser("history", parents=[common], help="one account's changes")
    history.add_argument("username")
    history.add_argument("--json", action="store_true", help="machine-readable output")
    history.add_argument("--limit", type=int, metavar="N", help="only the newest N changes")
    history.set_defaults(handler=cmd_history)

    database = commands.add_parser("db", parents=[common], help="database schema (Alembic)")
    db_commands = database.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_commands.add_parser(
        "upgrade", parents=[common], help="migrate to the latest schema"
    ).set_defaults(handler=cmd_db_upgrade)
    db_commands.add_parser(
        "current", parents=[common], help="print the schema revision"
    ).set_defaults(handler=cmd_db_current)

    config = commands.add_parser("config", parents=[common], help="configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    config_commands.add_parser(
        "check", parents=[common], help="validate; print the resolved config, secrets masked"
    ).set_defaults(handler=cmd_config_check)

    demo = commands.add_parser(
        "demo", parents=[common], help="sync sample accounts from the bundled fake API into SQLite"
    )
    demo.add_argument(
        "--db",
        metavar="PATH",
        default="trakt_etl_demo.db",
        help="SQLite file to (re)create (default: ./trakt_etl_demo.db)",
    )
    demo.set_defaults(handler=cmd_demo)
    return parser


def _load(args: argparse.Namespace) -> Config:
    path = resolve_config_path(args.config, os.environ)
    return load_config(path, os.environ)


def _setup_logging(args: argparse.Namespace, config: Config | None) -> None:
    settings = config.logging if config else None
    configure_logging(
        format=choose_format(
            args.log_format or (settings.format if settings else None), sys.stderr
        ),
        level=args.log_level or (settings.level if settings else "info"),
        secrets=config.global_secrets() if config else (),
    )


def _freeze(_config: Config) -> None:
    """The config lives as long as the process (or until a reload): spare the garbage collector
    from walking its objects again and again (with 100,000 accounts, that was a good part of a
    sync's CPU). What an earlier freeze kept is let go first, so a reloaded config's old one is
    collected."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def _prepared_engine(config: Config, *, migrate: bool | None = None) -> Engine:
    engine = db.make_engine(config.database.url)
    db.check_reachable(engine)
    db.ensure_schema(
        engine, auto_migrate=config.database.auto_migrate if migrate is None else migrate
    )
    return engine


def cmd_sync(args: argparse.Namespace) -> ExitCode:
    config = _load(args)
    _setup_logging(args, config)
    _freeze(config)
    engine = db.make_engine(config.database.url)
    with ProcessLock(lock_path_for(engine), wait=args.wait):
        return _sync(args, config, engine)


def _sync(args: argparse.Namespace, config: Config, engine: Engine) -> ExitCode:
    db.check_reachable(engine)
    db.ensure_schema(engine, auto_migrate=config.database.auto_migrate)
    control = RunControl()
    _on_stop_signals(lambda name: control.request_stop(f"stopped by {name}"))
    client = TraktClient(
        config.api,
        gate=RequestGate(config.api.max_requests_per_s, stop=control.stop),
        redactor=Redactor(config.global_secrets()),
    )
    heartbeat_s = config.schedule.heartbeat_s
    try:
        with engine.begin() as connection:
            worker_id = liveness.register_worker(connection, kind="sync", now=utc_now())
        heartbeat = liveness.Heartbeat(engine, worker_id, interval_s=heartbeat_s, clock=utc_now)
        heartbeat.start()
        try:
            # A signal must end the run within the bound even if a statement hangs on a lock.
            with (
                db.track_run_connections(engine) as connections,
                DatabaseWatchdog(
                    control,
                    connections.cancel,
                    stop_grace_s=shutdown_bound_s(config.api.timeout_s) / 2,
                ),
            ):
                summary = Syncer(
                    engine,
                    config,
                    client,
                    control=control,
                    worker_id=worker_id,
                    stale_after_s=liveness.stale_after(heartbeat_s),
                ).run(trigger="manual", only=args.account)
        finally:
            heartbeat.stop()
            with engine.begin() as connection:
                liveness.retire_worker(connection, worker_id, utc_now())
    except SQLAlchemyError as exc:
        raise DatabaseError(f"database error: {getattr(exc, 'orig', exc)}") from exc
    finally:
        client.close()
        engine.dispose()
    complete = summary.status != RunStatus.ABORTED and summary.counts.failed == 0
    return ExitCode.OK if complete else ExitCode.ACCOUNTS_FAILED


def _on_stop_signals(stop: Callable[[str], None]) -> None:
    """SIGTERM and SIGINT end a run cleanly: the account being written commits, then it closes."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def cmd_daemon(args: argparse.Namespace) -> ExitCode:
    config = _load(args)
    _setup_logging(args, config)
    _freeze(config)

    def reload() -> Config:
        return _load(args)

    def reloaded(new: Config) -> None:
        _setup_logging(args, new)
        _freeze(new)

    from etl.daemon import Daemon  # APScheduler: only the daemon needs it

    daemon = Daemon(
        config,
        load_config=reload,
        on_reload=reloaded,
        initial_run=not args.no_initial_run,
    )
    engine = db.make_engine(config.database.url)
    with ProcessLock(lock_path_for(engine), wait=args.wait):
        return daemon.serve()


def cmd_status(args: argparse.Namespace) -> ExitCode:
    from etl import report  # rich and the report queries: only status and history need them

    config = _load(args)
    _setup_logging(args, config)
    engine = _prepared_engine(config, migrate=False)
    try:
        with engine.connect() as connection:
            found = report.status_report(
                connection,
                now=utc_now(),
                runs=args.runs,
                stale_after_s=liveness.stale_after(config.schedule.heartbeat_s),
            )
    finally:
        engine.dispose()
    _show(found, as_json=args.json)
    return ExitCode.OK


def cmd_history(args: argparse.Namespace) -> ExitCode:
    from etl import report

    config = _load(args)
    _setup_logging(args, config)
    engine = _prepared_engine(config, migrate=False)
    try:
        with engine.connect() as connection:
            found = report.history_report(connection, args.username, limit=args.limit)
    finally:
        engine.dispose()
    _show(found, as_json=args.json)
    return ExitCode.OK


def _show(found: report.StatusReport | report.HistoryReport, *, as_json: bool) -> None:
    from rich.console import Console

    from etl import report

    if as_json:
        print(report.as_json(found))
        return
    console = Console(width=None if sys.stdout.isatty() else 140)
    if isinstance(found, report.StatusReport):
        report.render_status(found, console)
    else:
        report.render_history(found, console)


def cmd_db_upgrade(args: argparse.Namespace) -> ExitCode:
    config = _load(args)
    _setup_logging(args, config)
    engine = db.make_engine(config.database.url)
    try:
        db.check_reachable(engine)
        db.upgrade(engine)
        revision = db.current_revision(engine)
    finally:
        engine.dispose()
    log.info("db.upgraded", revision=revision, database=db.safe_url(config.database.url))
    print(f"database at revision {revision}")
    return ExitCode.OK


def cmd_db_current(args: argparse.Namespace) -> ExitCode:
    config = _load(args)
    _setup_logging(args, config)
    engine = db.make_engine(config.database.url)
    try:
        db.check_reachable(engine)
        revision = db.current_revision(engine)
    finally:
        engine.dispose()
    head = ", ".join(db.heads())
    state = "up to date" if revision == head else f"latest is {head}"
    print(f"{revision or 'empty (no schema yet)'} ({state})")
    return ExitCode.OK


def cmd_config_check(args: argparse.Namespace) -> ExitCode:
    config = _load(args)
    print(yaml.safe_dump(config.masked(), sort_keys=False, allow_unicode=True), end="")
    enabled = len(config.enabled_accounts())
    print(f"# config OK: {len(config.accounts)} accounts ({enabled} enabled)", file=sys.stderr)
    return ExitCode.OK


def cmd_demo(args: argparse.Namespace) -> ExitCode:
    from etl.demo import run_demo  # the demo pulls in the fake API; other commands need not

    configure_logging(
        format=choose_format(args.log_format, sys.stderr), level=args.log_level or "warning"
    )
    return run_demo(args.db, out=sys.stdout)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Until the config is read, log with what the command line says.
    configure_logging(
        format=choose_format(args.log_format, sys.stderr), level=args.log_level or "info"
    )
    handler: Command = args.handler
    try:
        code = int(handler(args))
    except TraktEtlError as exc:
        code = int(exit_code_for(exc))
        log.error("command.failed", command=args.command, error=str(exc), exit_code=code)
    except KeyboardInterrupt:
        log.warning("command.interrupted", command=args.command)
        code = 130
    _exit_past_stuck_threads(code)
    return code


# Threads still finishing (a scheduler's idle pool) get this long to end before the process
# leaves without them.
THREADS_GRACE_S = 2.0


def _exit_past_stuck_threads(code: int) -> None:
    """Leave now, whatever threads are left, instead of letting Python join them at exit.

    A stopped run abandons its fetches in flight: do not wait out their request timeouts. A run
    stuck in the database past the daemon's shutdown bound (the server gone, its cancel unheard)
    holds a scheduler pool thread that Python would join forever. Everything that matters is
    committed and logged by now; only such threads are left.
    """
    others = [t for t in _joined_at_exit() if t.is_alive()]
    if not others:
        return
    if not any(t.name.startswith("fetch") for t in others):
        until = time.monotonic() + THREADS_GRACE_S
        for thread in others:
            thread.join(max(0.0, until - time.monotonic()))
        if not any(t.is_alive() for t in others):
            return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _joined_at_exit() -> list[threading.Thread]:
    """The threads Python waits for at exit: non-daemon ones, and every thread of a
    concurrent.futures pool (fetch threads, APScheduler's), daemon or not."""
    from concurrent.futures import thread as futures_thread

    pooled = set(getattr(futures_thread, "_threads_queues", {}))
    main = threading.main_thread()
    return [t for t in threading.enumerate() if t is not main and (not t.daemon or t in pooled)]


if __name__ == "__main__":
    sys.exit(main())
