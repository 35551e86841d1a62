"""The `trakt-etl` command line: parses arguments, wires the pieces, maps errors to exit codes.

This is the only module that knows everything, and the only place where an error becomes a
message and an exit status (`ExitCode`, CONTRACT.md "Command line").

Environment: TRAKT_ETL_CONFIG (config path), TRAKT_ETL_DATABASE_URL (overrides database.url).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

import structlog
import yaml
from sqlalchemy import Engine

from etl import __version__, db
from etl.client import TraktClient
from etl.config import Config, load_config, resolve_config_path
from etl.errors import ExitCode, TraktEtlError, exit_code_for
from etl.logs import LEVELS, choose_format, configure_logging
from etl.redact import Redactor
from etl.sync import Syncer

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
    sync.set_defaults(handler=cmd_sync)

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
    engine = _prepared_engine(config)
    client = TraktClient(config.api, redactor=Redactor(config.global_secrets()))
    try:
        summary = Syncer(engine, config, client).run(trigger="manual", only=args.account)
    finally:
        client.close()
        engine.dispose()
    return ExitCode.OK if summary.counts.failed == 0 else ExitCode.ACCOUNTS_FAILED


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
        return int(handler(args))
    except TraktEtlError as exc:
        code = exit_code_for(exc)
        log.error("command.failed", command=args.command, error=str(exc), exit_code=int(code))
        return int(code)
    except KeyboardInterrupt:
        log.warning("command.interrupted", command=args.command)
        return 130


if __name__ == "__main__":
    sys.exit(main())
