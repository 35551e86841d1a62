"""Structured logging: structlog configured for JSON lines or a console, with secrets masked.

The event names and keys are an interface (CONTRACT.md, "Logs"). Exceptions are rendered without
local variables (structlog's stock `dict_tracebacks` would show them, and with them passwords),
and every string in a line passes the redactor before it is rendered.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

import structlog
from structlog.tracebacks import ExceptionDictTransformer
from structlog.typing import EventDict, Processor, WrappedLogger

from etl.redact import MASK, Redactor, current_account_redactor

LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass(frozen=True, slots=True)
class LogSettings:
    """How this process logs: what a fetch process needs to log the same way."""

    format: str = "json"
    level: str = "info"
    secrets: tuple[str, ...] = ()


_settings = LogSettings()


def current_settings() -> LogSettings:
    return _settings

# Keys whose values are masked whatever they hold.
_SECRET_KEYS = ("password", "secret", "token", "api_key", "apikey", "authorization")


def _names_a_secret(text: str) -> bool:
    # Plain substring tests: a case-insensitive regex took 100 µs on a long line.
    lowered = text.lower()
    return any(word in lowered for word in _SECRET_KEYS)


_is_secret_key = functools.lru_cache(maxsize=4096)(_names_a_secret)


class _RedactProcessor:
    def __init__(self, redactor: Redactor) -> None:
        self._redactor = redactor

    def __call__(self, _logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
        account = current_account_redactor()
        return {
            key: self._clean(key, value, self._redactor, account)
            for key, value in event_dict.items()
        }

    def _clean(self, key: object, value: Any, redactor: Redactor, account: Redactor) -> Any:
        if isinstance(key, str) and _is_secret_key(key):
            return MASK if value not in (None, "") else value
        if isinstance(value, str):
            return account.redact(redactor.redact(value))
        if isinstance(value, Mapping):
            return {k: self._clean(k, v, redactor, account) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._clean(None, v, redactor, account) for v in value]
        if value is None or isinstance(value, (bool, int, float)):
            return value
        # Anything else (an exception, a set, a URL object) would be rendered from its text by
        # the renderer, after this processor: redact that text now.
        return self._clean(key, str(value), redactor, account)


class _RedactingJSONRenderer:
    """JSON lines with secrets masked, cheaply: render the line, and walk the event to mask
    secrets only when the line shows one (or a key that names one).

    Most lines hold no secret; walking every value of every line (an `account.changed` holds
    a few hundred) cost more than the rest of a sync's work for an unchanged account.
    """

    def __init__(self, redactor: Redactor) -> None:
        self._redactor = redactor
        self._walk = _RedactProcessor(redactor)

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> str:
        line = _dumps(event_dict)
        if (
            _names_a_secret(line)
            or self._redactor.found_in(line)
            or current_account_redactor().found_in(line)
        ):
            line = _dumps(self._walk(logger, name, event_dict))
        return line


def _dumps(event_dict: EventDict) -> str:
    return json.dumps(event_dict, ensure_ascii=False, default=str)


def choose_format(requested: str | None, stream: TextIO) -> str:
    """JSON unless asked otherwise, console when nobody asked and a person is watching."""
    if requested:
        return requested
    return "console" if stream.isatty() else "json"


def configure_logging(
    *,
    format: str = "json",
    level: str = "info",
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> None:
    """Set up structlog for the whole process; call again to change any of it."""
    global _settings
    secrets = tuple(sorted(set(secrets)))
    _settings = LogSettings(format, level, secrets)
    out = stream if stream is not None else sys.stderr
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
    ]
    redactor = Redactor(secrets)
    last: list[Processor]
    if format == "json":
        exceptions: Processor = structlog.processors.ExceptionRenderer(
            ExceptionDictTransformer(show_locals=False)
        )
        last = [_RedactingJSONRenderer(redactor)]
    else:
        exceptions = structlog.processors.format_exc_info
        last = [
            _RedactProcessor(redactor),
            structlog.dev.ConsoleRenderer(
                colors=out.isatty(), exception_formatter=structlog.dev.plain_traceback
            ),
        ]
    structlog.configure(
        processors=[*shared, exceptions, *last],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    _bridge_stdlib_logging()


class _StdlibBridge(logging.Handler):
    """Libraries (APScheduler, Alembic) log through stdlib logging; their warnings and errors go
    through structlog too, so that stderr stays one JSON object per line."""

    def emit(self, record: logging.LogRecord) -> None:
        logger = structlog.get_logger(record.name)
        method = logger.error if record.levelno >= logging.ERROR else logger.warning
        method("library.log", logger=record.name, message=record.getMessage())


def _bridge_stdlib_logging() -> None:
    root = logging.getLogger()
    root.handlers = [handler for handler in root.handlers if not isinstance(handler, _StdlibBridge)]
    bridge = _StdlibBridge(level=logging.WARNING)
    root.addHandler(bridge)
    root.setLevel(logging.WARNING)


def get_logger(name: str | None = None) -> Any:
    """The module's logger; events are named ``noun.verb`` (``account.synced``)."""
    return structlog.get_logger(name)
