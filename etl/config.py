"""Loading and validating the YAML configuration (CONTRACT.md, "Configuration").

This module owns:

- where the config file is found (`resolve_config_path`: ``--config``, ``$TRAKT_ETL_CONFIG``,
  ``./config.yaml``);
- turning its text into a validated, immutable `Config` (`parse_config`, `load_config`): YAML
  parsing, ``${VAR}`` / ``${VAR:-default}`` interpolation from the environment, the
  ``$TRAKT_ETL_DATABASE_URL`` override, and every rule the contract sets on the values;
- which values are secrets (`Config.secrets`) and the masked view ``trakt-etl config check``
  prints (`Config.masked`).

Every problem becomes a `ConfigError` whose ``path`` names the key (``accounts[2].password``). No
message ever contains a value that might be a secret. The only IO is reading the file; the
environment is always passed in, so everything here is testable without touching either.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    Field,
    PlainValidator,
    ValidationError,
    field_validator,
    model_validator,
)
from yaml.composer import Composer

from etl.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("config.yaml")
ENV_PREFIX = "TRAKT_ETL_"
CONFIG_PATH_ENV = f"{ENV_PREFIX}CONFIG"
DATABASE_URL_ENV = f"{ENV_PREFIX}DATABASE_URL"

DEFAULT_INTERVAL = "15m"
MASK = "***"
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error", "critical")

_INTERVAL_UNITS: dict[str, int] = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_INTERVAL_RE = re.compile(r"(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[smhd])")
_INTERVAL_HELP = "expected a number with a unit s, m, h or d, such as 30s, 15m, 1h or 2d"
_CRON_HELP = (
    "expected a standard five-field crontab line "
    "(minute hour day-of-month month day-of-week), such as '*/15 * * * *'"
)
# `$${` is a literal `${`; `${NAME}` and `${NAME:-default}` are references; any other `${` is a
# mistake we report rather than pass through (it would otherwise reach the API as a password).
_REFERENCE_RE = re.compile(
    r"\$\$\{|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<default>:-[^}]*)?\}|\$\{"
)
_SHA1_RE = re.compile(r"[0-9a-fA-F]{40}")


# --- the models ------------------------------------------------------------------------------


class _Section(BaseModel, frozen=True, extra="forbid"):
    """Common settings: immutable, unknown keys refused, lax coercion (``"10"`` -> 10).

    Every subclass repeats ``frozen=True`` so that mypy (without the pydantic plugin) knows its
    fields are read-only too.
    """


def _blank_to_none(value: Any) -> Any:
    """``""`` (what ``${X:-}`` gives when X is unset) means "not given"."""
    return None if value == "" else value


def _version_from_text(value: Any) -> Any:
    """Accept ``"2"`` (from ``${API_VERSION:-1}``) for a version, which Literal alone refuses."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return value


def _fetch_processes(value: Any) -> Literal["auto"] | int:
    if value == "auto":
        return "auto"
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError('must be "auto" or a number of processes (0: none)')


# One message at the key for anything else, rather than one per member of the union.
FetchProcesses = Annotated[Literal["auto"] | int, PlainValidator(_fetch_processes)]

# Secrets stay out of repr(): a Config in a traceback or a debug line must not show them.
_Secret = Annotated[str | None, Field(repr=False)]


class DatabaseConfig(_Section, frozen=True):
    url: Annotated[str, Field(repr=False)] = "sqlite:///trakt_etl.db"  # may hold a password
    auto_migrate: bool = True

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        # The message must not repeat the URL: it may hold a database password.
        try:
            _parse_url(value)
        except ValueError:
            raise ValueError(
                "is not a SQLAlchemy database URL "
                "(such as sqlite:///trakt_etl.db or postgresql+psycopg://user@host/dbname)"
            ) from None
        return value

    def password(self) -> str | None:
        """The password inside the URL, if it has one."""
        try:
            password = _parse_url(self.url).password
        except ValueError:  # pragma: no cover - the validator refused such URLs
            return None
        return str(password) if password else None

    def masked_url(self) -> str:
        """The URL with its password (if any) replaced by ``***``."""
        return str(_parse_url(self.url).render_as_string(hide_password=True))


class ApiConfig(_Section, frozen=True):
    base_url: str = "https://api.trakt.tv"
    version: Literal[1, 2] = 1
    api_key: _Secret = None
    client_secret: _Secret = None
    timeout_s: Annotated[float, Field(gt=0)] = 10.0
    retries: Annotated[int, Field(ge=0)] = 4
    concurrency: Annotated[int, Field(ge=1)] = 8
    max_requests_per_s: Annotated[float, Field(gt=0)] = 3.0
    max_body_bytes: Annotated[int, Field(ge=1024)] = 1_048_576
    # Retry pacing: exponential from backoff_initial_s up to backoff_max_s, with jitter; a
    # server's Retry-After (429, 503) or rate-limit reset is honoured up to retry_after_max_s.
    backoff_initial_s: Annotated[float, Field(ge=0)] = 0.5
    backoff_max_s: Annotated[float, Field(ge=0)] = 30.0
    retry_after_max_s: Annotated[float, Field(ge=0)] = 60.0
    # Fetch processes, to fetch on more than one core (etl.fetchprocs): 0 fetches on threads of
    # the sync's own process; "auto" uses one per core for big, fast runs, else 0.
    fetch_processes: FetchProcesses = "auto"

    _blank_secrets = field_validator("api_key", "client_secret", mode="before")(_blank_to_none)
    _version_text = field_validator("version", mode="before")(_version_from_text)

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an http(s) URL, such as https://api.trakt.tv")
        return value.strip().rstrip("/")


class ScheduleConfig(_Section, frozen=True):
    """When the daemon runs: `interval` or `cron`, not both; neither means every 15 minutes."""

    interval: str | None = None
    cron: str | None = None
    jitter_s: Annotated[float, Field(ge=0)] = 30.0
    # A run still going after this is ended (default: the interval; for cron, the gap between
    # two firings). Per-request timeouts alone cannot bound a run: a database lock can hang too.
    run_timeout_s: Annotated[float, Field(gt=0)] | None = None
    # How late a run may start and still run (APScheduler's misfire grace; default: the
    # interval). A run later than that is skipped, with a warning saying so.
    misfire_grace_s: Annotated[float, Field(gt=0)] | None = None
    heartbeat_s: Annotated[float, Field(gt=0)] = 15.0
    # GET /healthz for orchestrators: 200 while the scheduler beats, 503 once it is stuck.
    healthz_port: Annotated[int, Field(ge=0, le=65535)] | None = None
    healthz_host: str = "127.0.0.1"

    @model_validator(mode="before")
    @classmethod
    def _default_interval(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("interval") is None and data.get("cron") is None:
            return {**data, "interval": DEFAULT_INTERVAL}
        return data

    @field_validator("interval", mode="before")
    @classmethod
    def _interval_needs_unit(cls, value: Any) -> Any:
        if isinstance(value, int | float) and not isinstance(value, bool):
            raise ValueError(f"a bare number has no unit; {_INTERVAL_HELP}")
        return value

    @field_validator("interval")
    @classmethod
    def _check_interval(cls, value: str | None) -> str | None:
        if value is not None:
            parse_interval(value)
            return value.strip()
        return value

    @field_validator("cron")
    @classmethod
    def _check_cron(cls, value: str | None) -> str | None:
        if value is not None:
            check_cron(value)
            return " ".join(value.split())
        return value

    @model_validator(mode="after")
    def _one_or_the_other(self) -> ScheduleConfig:
        if self.interval is not None and self.cron is not None:
            raise ValueError("give either interval or cron, not both")
        return self

    @property
    def interval_seconds(self) -> int | None:
        """The interval in seconds, or None when the schedule is a cron line."""
        return None if self.interval is None else parse_interval(self.interval)

    def period_s(self) -> float:
        """Seconds between two runs: the interval, or the gap between the cron line's next two
        firings. It is also the length of the windows accounts fall due in (etl.claims)."""
        if self.interval is not None:
            return float(parse_interval(self.interval))
        assert self.cron is not None
        trigger = _cron_trigger(self.cron)
        first = trigger.get_next_fire_time(None, datetime.now(UTC))
        second = trigger.get_next_fire_time(first, first + timedelta(microseconds=1))
        return float((second - first).total_seconds())


class LoggingConfig(_Section, frozen=True):
    format: Literal["json", "console"] | None = None
    level: str = "info"

    @field_validator("format", mode="before")
    @classmethod
    def _format_lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("level")
    @classmethod
    def _check_level(cls, value: str) -> str:
        level = value.strip().lower()
        if level not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return level


@dataclass(frozen=True, slots=True)
class AccountConfig:
    """One configured account, compact: a config may list 100,000 of them, all kept in memory
    (a validated pydantic model each took ten times the room). Made by `_AccountEntry`."""

    username: str
    enabled: bool = True
    api_version: Literal[1, 2] | None = None
    password: str | None = field(default=None, repr=False)
    password_sha1: str | None = field(default=None, repr=False)
    access_token: str | None = field(default=None, repr=False)
    refresh_token: str | None = field(default=None, repr=False)

    def password_sha1_hex(self) -> str | None:
        """The SHA-1 hex of the password (what API v1 sends), or `password_sha1` as given."""
        if self.password is not None:
            return hashlib.sha1(self.password.encode("utf-8"), usedforsecurity=False).hexdigest()
        return None if self.password_sha1 is None else self.password_sha1.lower()

    def secrets(self) -> set[str]:
        """Every non-empty secret of this account: password, its SHA-1, tokens."""
        values = {
            self.password,
            self.password_sha1_hex(),
            self.password_sha1,
            self.access_token,
            self.refresh_token,
        }
        return {value for value in values if value}


class _AccountEntry(_Section, frozen=True):
    """What an item of `accounts:` may say: the validation of one account."""

    username: str
    enabled: bool = True
    api_version: Literal[1, 2] | None = None
    password: _Secret = None
    password_sha1: _Secret = None
    access_token: _Secret = None
    refresh_token: _Secret = None

    _blank_secrets = field_validator(
        "password", "password_sha1", "access_token", "refresh_token", mode="before"
    )(_blank_to_none)
    _version_text = field_validator("api_version", mode="before")(_version_from_text)

    @field_validator("username")
    @classmethod
    def _check_username(cls, value: str) -> str:
        if not value:
            raise ValueError("must not be empty")
        if any(char.isspace() for char in value):
            raise ValueError("must not contain whitespace")
        return value

    @field_validator("password_sha1")
    @classmethod
    def _check_sha1(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not _SHA1_RE.fullmatch(value):
            # Never repeat the value: it is a credential.
            raise ValueError("must be exactly 40 hexadecimal characters (the password's SHA-1)")
        return value.lower()

    def compact(self) -> AccountConfig:
        return AccountConfig(
            self.username,
            self.enabled,
            self.api_version,
            self.password,
            self.password_sha1,
            self.access_token,
            self.refresh_token,
        )


ACCOUNT_KEYS = tuple(_AccountEntry.model_fields)


def account_from(item: Any, index: int) -> AccountConfig:
    """`accounts[index]` of the config, validated; a `ConfigError` names what is wrong."""
    if isinstance(item, AccountConfig):
        return item
    try:
        return _AccountEntry.model_validate(item).compact()
    except ValidationError as exc:
        raise _config_error(exc, prefix=("accounts", index)) from None


def _accounts(value: Any) -> list[AccountConfig]:
    """`accounts:` given as data (dicts), or as accounts already read by `parse_config`."""
    if not isinstance(value, list | tuple):
        raise ConfigError("Input should be a valid list of accounts", path="accounts")
    return [account_from(item, index) for index, item in enumerate(value)]


class Config(_Section, frozen=True):
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    accounts: Annotated[list[AccountConfig], PlainValidator(_accounts)] = Field(
        default_factory=list
    )

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        """A section given with nothing under it (``api:``) is an empty section, not null."""
        if not isinstance(data, Mapping):
            return data
        empty: dict[str, Any] = {"accounts": []}
        return {key: empty.get(key, {}) if value is None else value for key, value in data.items()}

    @model_validator(mode="after")
    def _check_accounts(self) -> Config:
        # ConfigError is not a ValueError, so pydantic lets it through untouched, path and all.
        if self.enabled_accounts() and not self.api.api_key:
            raise ConfigError(
                "is required when an account is enabled (the trakt API key)", path="api.api_key"
            )
        seen: set[str] = set()
        for index, account in enumerate(self.accounts):
            key = account.username.casefold()
            if key == account.username:
                key = account.username  # the same text: keep one string, not two
            if key in seen:
                first = next(
                    n for n, a in enumerate(self.accounts) if a.username.casefold() == key
                )
                raise ConfigError(
                    f"duplicate username '{account.username}': accounts[{first}] already has it",
                    path=f"accounts[{index}].username",
                )
            seen.add(key)
            if account.enabled:
                _check_credentials(account, index, self.version_of(account))
        return self

    def version_of(self, account: AccountConfig) -> int:
        """The API version this account is fetched with."""
        return account.api_version if account.api_version is not None else self.api.version

    def enabled_accounts(self) -> list[AccountConfig]:
        return [account for account in self.accounts if account.enabled]

    def global_secrets(self) -> set[str]:
        """The secrets not tied to one account: the api key, the client secret, the database
        password. Cheap to check on every log line, unlike the accounts' secrets."""
        found = {value for value in (self.api.api_key, self.api.client_secret) if value}
        database_password = self.database.password()
        if database_password:
            found.add(database_password)
        return found

    def secrets(self) -> set[str]:
        """Every non-empty secret: the api key, the client secret, the database password and
        every account's secrets. Logging redacts these; no table or message may hold one."""
        found = self.global_secrets()
        for account in self.accounts:
            found |= account.secrets()
        return found

    def masked(self) -> dict[str, Any]:
        """The resolved config as plain data, every secret replaced by ``***``."""
        data = self.model_dump(mode="json", exclude={"accounts"})
        data["database"]["url"] = self.database.masked_url()
        for key in ("api_key", "client_secret"):
            if data["api"][key] is not None:
                data["api"][key] = MASK
        data["accounts"] = [
            {key: getattr(account, key) for key in ACCOUNT_KEYS} for account in self.accounts
        ]
        for account in data["accounts"]:
            for key in ("password", "password_sha1", "access_token", "refresh_token"):
                if account[key] is not None:
                    account[key] = MASK
        # Belt and braces: a secret pasted into some other value (a URL, say) is masked there too.
        secrets = sorted(self.secrets(), key=len, reverse=True)
        scrubbed: dict[str, Any] = _map_strings(data, lambda text: _scrub(text, secrets))
        return scrubbed


def _check_credentials(account: AccountConfig, index: int, version: int) -> None:
    if version == 1:
        given = [value for value in (account.password, account.password_sha1) if value is not None]
        if not given:
            raise ConfigError(
                f"account '{account.username}' uses API v1 and needs password or password_sha1",
                path=f"accounts[{index}].password",
            )
        if len(given) > 1:
            raise ConfigError(
                "give either password or password_sha1, not both",
                path=f"accounts[{index}].password",
            )
    elif account.access_token is None:
        raise ConfigError(
            f"account '{account.username}' uses API v2 and needs access_token",
            path=f"accounts[{index}].access_token",
        )


# --- values with a syntax of their own --------------------------------------------------------

# SQLAlchemy and APScheduler are imported where they are needed: fetch processes read their
# ApiConfig from this module, and importing both cost each of them a third of a second.


def _parse_url(url: str) -> Any:
    """The SQLAlchemy URL; ValueError if it is not one."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url)
    except ArgumentError as exc:
        raise ValueError(str(exc)) from None


def _cron_trigger(text: str) -> Any:
    # APScheduler 3 ships no type information.
    from apscheduler.triggers.cron import CronTrigger  # type: ignore[import-untyped]

    return CronTrigger.from_crontab(text, timezone=UTC)



def parse_interval(text: str) -> int:
    """``30s`` / ``15m`` / ``1h`` / ``2d`` (also ``1.5h``) -> seconds, at least 1."""
    match = _INTERVAL_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"invalid interval {text!r}: {_INTERVAL_HELP}")
    try:
        seconds = Decimal(match["number"]) * _INTERVAL_UNITS[match["unit"]]
    except InvalidOperation:  # pragma: no cover - the regex admits only decimal numbers
        raise ValueError(f"invalid interval {text!r}: {_INTERVAL_HELP}") from None
    if seconds < 1 or seconds != seconds.to_integral_value():
        raise ValueError(
            f"invalid interval {text!r}: must be a whole number of seconds, at least 1s"
        )
    return int(seconds)


def check_cron(text: str) -> None:
    """Raise ValueError unless `text` is a standard five-field crontab line."""
    fields = text.split()
    if len(fields) != 5:
        raise ValueError(f"invalid cron line {text!r}: has {len(fields)} fields; {_CRON_HELP}")
    try:
        _cron_trigger(text)
    except ValueError as exc:
        raise ValueError(f"invalid cron line {text!r}: {exc}; {_CRON_HELP}") from None


# --- finding, reading and parsing -------------------------------------------------------------


def resolve_config_path(cli_path: str | None, env: Mapping[str, str]) -> Path:
    """``--config PATH``, else ``$TRAKT_ETL_CONFIG``, else ``./config.yaml``."""
    if cli_path:
        return Path(cli_path).expanduser()
    from_env = env.get(CONFIG_PATH_ENV)
    if from_env:
        return Path(from_env).expanduser()
    return DEFAULT_CONFIG_PATH


def load_config(path: Path, env: Mapping[str, str]) -> Config:
    """Read and validate the config file at `path`; every problem is a `ConfigError`."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} not found; give another with --config PATH or ${CONFIG_PATH_ENV}"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    return parse_config(text, env, source=str(path))


def parse_config(text: str, env: Mapping[str, str], source: str = "config.yaml") -> Config:
    """YAML text -> a validated `Config`; every problem is a `ConfigError` naming the key."""
    data, accounts = _load_yaml(text, source, env)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: the top level must be a mapping of sections "
            f"(database, api, schedule, logging, accounts), not {_yaml_kind(data)}"
        )
    if accounts is not None:
        data["accounts"] = accounts
    database_url = env.get(DATABASE_URL_ENV)
    if database_url:
        section = data.get("database")
        if section is None:
            data["database"] = {"url": database_url}
        elif isinstance(section, dict):
            data["database"] = {**section, "url": database_url}
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise _config_error(exc) from None


# libyaml's parser when PyYAML was built with it (the wheels are): ~10x faster on big account
# lists. PyYAML's composer on top of it builds nodes one top-level value at a time, and the
# accounts one account at a time, so a file of 100,000 accounts is never held whole as nodes
# or data: each account is checked, interpolated, validated and kept compact as it is read.
_SafeLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_SafeLoader):  # type: ignore[misc]
    compose_node = Composer.compose_node
    compose_scalar_node = Composer.compose_scalar_node
    compose_sequence_node = Composer.compose_sequence_node
    compose_mapping_node = Composer.compose_mapping_node


def _load_yaml(
    text: str, source: str, env: Mapping[str, str]
) -> tuple[Any, list[AccountConfig] | None]:
    """The document's data, but for `accounts:` (a list) which comes read and validated."""
    loader = _Loader(text)
    loader.anchors = {}
    try:
        return _read_document(loader, env)
    except yaml.MarkedYAMLError as exc:
        # Not str(exc): it quotes the offending line, which may hold a secret.
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or "malformed document"
        raise ConfigError(f"invalid YAML in {source}{where}: {problem}") from None
    except yaml.YAMLError:
        raise ConfigError(f"invalid YAML in {source}") from None
    finally:
        loader.dispose()


def _read_document(loader: Any, env: Mapping[str, str]) -> tuple[Any, list[AccountConfig] | None]:
    loader.get_event()  # the stream starts
    if loader.check_event(yaml.StreamEndEvent):
        return None, None
    loader.get_event()  # the document starts
    accounts: list[AccountConfig] | None = None
    data: Any
    if not loader.check_event(yaml.MappingStartEvent) or loader.peek_event().anchor:
        data = _interpolate(_read_value(loader, ""), env, "", {})  # not one to stream
    else:
        loader.get_event()
        data = {}
        first_line: dict[str, int] = {}
        while not loader.check_event(yaml.MappingEndEvent):
            key_node = loader.compose_node(None, None)
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` at the top
                merged = _interpolate(_read_value(loader, ""), env, "", {})
                for key, value in merged.items() if isinstance(merged, dict) else ():
                    data.setdefault(key, value)
                continue
            key = str(loader.construct_document(key_node))
            if key in first_line:
                raise ConfigError(
                    f"duplicate key '{key}' (first given at line {first_line[key]})", path=key
                )
            first_line[key] = key_node.start_mark.line + 1
            # Interpolated as they are read, so that the first missing variable reported is
            # the first in the file.
            if key == "accounts" and _is_plain_sequence(loader):
                accounts = _read_accounts(loader, env)
            else:
                data[key] = _interpolate(_read_value(loader, key), env, key, {})
        loader.get_event()
    loader.get_event()  # the document ends
    if not loader.check_event(yaml.StreamEndEvent):
        raise ConfigError("the config file must hold one YAML document, not several")
    return data, accounts


def _is_plain_sequence(loader: Any) -> bool:
    """A sequence next that no alias can point to (an anchored one is read whole)."""
    return bool(loader.check_event(yaml.SequenceStartEvent)) and not loader.peek_event().anchor


def _read_value(loader: Any, path: str) -> Any:
    node = loader.compose_node(None, None)
    _check_nodes(node, path, set(), set())
    return loader.construct_document(node)


def _read_accounts(loader: Any, env: Mapping[str, str]) -> list[AccountConfig]:
    loader.get_event()  # the sequence starts
    accounts: list[AccountConfig] = []
    while not loader.check_event(yaml.SequenceEndEvent):
        index = len(accounts)
        path = f"accounts[{index}]"
        item = _interpolate(_read_value(loader, path), env, path, {})
        accounts.append(account_from(item, index))
    loader.get_event()
    return accounts


def _check_nodes(node: yaml.Node | None, path: str, visited: set[int], ancestors: set[int]) -> None:
    """Refuse duplicate keys (PyYAML silently keeps the last) and self-referencing aliases."""
    if node is None or id(node) in visited:
        if node is not None and id(node) in ancestors:
            raise ConfigError("a YAML alias refers to a node containing itself", path=path or None)
        return
    visited.add(id(node))
    ancestors.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = str(key_node.value)
                child = _join_key(path, key)
                if key in first_line:
                    raise ConfigError(
                        f"duplicate key '{key}' (first given at line {first_line[key]})",
                        path=child,
                    )
                first_line[key] = key_node.start_mark.line + 1
            else:
                child = path
            _check_nodes(value_node, child, visited, ancestors)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_nodes(item, f"{path}[{index}]", visited, ancestors)
    ancestors.discard(id(node))


def _yaml_kind(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    return f"a {type(value).__name__}"


# --- ${VAR} interpolation ---------------------------------------------------------------------


def _interpolate(value: Any, env: Mapping[str, str], path: str, memo: dict[int, Any]) -> Any:
    """Replace references in every string scalar of the parsed document (never the raw text,
    so a value that looks like YAML stays one string)."""
    if isinstance(value, str):
        return _interpolate_string(value, env, path)
    if not isinstance(value, dict | list):
        return value
    if id(value) in memo:  # an alias: the same object again
        return memo[id(value)]
    result: Any
    if isinstance(value, dict):
        # Keys become strings (`1: x` is an unknown key '1', not a type error at `[1]`).
        result = {
            str(key): _interpolate(item, env, _join_key(path, key), memo)
            for key, item in value.items()
        }
    else:
        result = [_interpolate(item, env, f"{path}[{i}]", memo) for i, item in enumerate(value)]
    memo[id(value)] = result
    return result


def _interpolate_string(text: str, env: Mapping[str, str], path: str) -> str:
    if "${" not in text:
        return text

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        name = match["name"]
        if name is None:
            raise ConfigError(
                "malformed ${...} reference: write ${NAME} or ${NAME:-default}, "
                "or $${ for a literal ${",
                path=path or None,
            )
        default = match["default"]
        found = env.get(name)
        if default is not None:  # bash's ${NAME:-default}: the default when unset or empty
            return found if found else default[2:]
        if found is None:
            raise ConfigError(f"environment variable {name} is not set", path=path or None)
        return found

    return _REFERENCE_RE.sub(replace, text)


# --- errors and helpers -----------------------------------------------------------------------


def _join_key(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _format_loc(loc: Sequence[int | str]) -> str:
    path = ""
    for part in loc:
        path = f"{path}[{part}]" if isinstance(part, int) else _join_key(path, part)
    return path


_SECTION_MODELS: dict[str, type[BaseModel]] = {
    "database": DatabaseConfig,
    "api": ApiConfig,
    "schedule": ScheduleConfig,
    "logging": LoggingConfig,
    "accounts": _AccountEntry,
}


def _unknown_key_message(loc: Sequence[int | str]) -> str:
    key = str(loc[-1])
    parent = [part for part in loc[:-1] if isinstance(part, str)]
    model = _SECTION_MODELS.get(parent[0]) if parent else Config
    message = f"unknown key '{key}'"
    if model is not None:
        close = difflib.get_close_matches(key, list(model.model_fields), n=1)
        if close:
            message += f" (did you mean '{close[0]}'?)"
    return message


def _config_error(exc: ValidationError, prefix: tuple[int | str, ...] = ()) -> ConfigError:
    """The first problem pydantic found, as a ConfigError; never includes the input value.

    `prefix` is where the validated value sits in the config (``("accounts", 2)``).
    """
    problems: list[tuple[str, str]] = []
    for error in exc.errors(include_input=False, include_url=False):
        loc = (*prefix, *error["loc"])
        if error["type"] == "extra_forbidden":
            message = _unknown_key_message(loc)
        else:
            message = error["msg"].removeprefix("Value error, ")
        problems.append((_format_loc(loc), message))
    path, message = problems[0]
    if len(problems) > 1:
        others = ", ".join(other or "(top level)" for other, _ in problems[1:])
        message += f" (and {len(problems) - 1} more: {others})"
    return ConfigError(message, path=path or None)


def _map_strings(value: Any, func: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return func(value)
    if isinstance(value, dict):
        return {key: _map_strings(item, func) for key, item in value.items()}
    if isinstance(value, list):
        return [_map_strings(item, func) for item in value]
    return value


def _scrub(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, MASK)
    return text
