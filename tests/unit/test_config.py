"""Unit tests for etl.config: the YAML configuration as CONTRACT.md describes it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tracemalloc
from pathlib import Path

import pytest
from pydantic import ValidationError

from etl.config import (
    DEFAULT_CONFIG_PATH,
    MASK,
    AccountConfig,
    Config,
    load_config,
    parse_config,
    parse_interval,
    resolve_config_path,
)
from etl.errors import ConfigError, ExitCode

CONTRACT_EXAMPLE = """\
database:
  url: sqlite:///trakt_etl.db      # any SQLAlchemy URL; $TRAKT_ETL_DATABASE_URL overrides it
  auto_migrate: true               # alembic upgrade head before work
api:
  base_url: https://api.trakt.tv
  version: 1                       # 1: POST account/settings/{apikey} (the seed); 2: GET users/settings
  api_key: ${TRAKT_API_KEY}        # v1: the {apikey} path segment; v2: the trakt-api-key header
  client_secret: ${TRAKT_CLIENT_SECRET:-}   # v2 only: refreshing access tokens
  timeout_s: 10
  retries: 4                       # per account, for timeouts, resets, 429 and 5xx
  concurrency: 8                   # accounts fetched at once
  max_requests_per_s: 3            # client-side rate limit across all accounts
schedule:
  interval: 15m                    # or  cron: "*/15 * * * *"
  jitter_s: 30
logging:
  format: json                     # json | console (default: console on a terminal, json otherwise)
  level: info
accounts:
  - username: justin
    password: ${JUSTIN_PASSWORD}   # v1: sent as its SHA-1 hex, as the API asks
  - username: sean
    password_sha1: 5baa61e4c9b93f3f0682250b6cf8331b7ee68fd8
  - username: lara
    api_version: 2                 # per-account override
    access_token: ${LARA_TOKEN}
    refresh_token: ${LARA_REFRESH:-}
  - username: retired
    enabled: false
"""  # noqa: E501 - verbatim from CONTRACT.md

EXAMPLE_ENV = {
    "TRAKT_API_KEY": "api-key-0123456789",
    "JUSTIN_PASSWORD": "justins-secret-pw",
    "LARA_TOKEN": "lara-access-token-xyz",
}

# A minimal valid header for tests that add accounts.
API = "api:\n  api_key: the-api-key\n"


def config_error(text: str, env: dict[str, str] | None = None) -> ConfigError:
    """Parse `text`, which must fail, and return the ConfigError."""
    with pytest.raises(ConfigError) as caught:
        parse_config(text, env or {})
    return caught.value


# --- the contract's example -----------------------------------------------------------------


def test_contract_example_parses_with_its_values() -> None:
    """The contract's full example YAML gives exactly the values it shows."""
    config = parse_config(CONTRACT_EXAMPLE, EXAMPLE_ENV)

    assert config.database.url == "sqlite:///trakt_etl.db"
    assert config.database.auto_migrate is True
    assert config.api.base_url == "https://api.trakt.tv"
    assert config.api.version == 1
    assert config.api.api_key == "api-key-0123456789"
    assert config.api.client_secret is None
    assert config.api.timeout_s == 10
    assert config.api.retries == 4
    assert config.api.concurrency == 8
    assert config.api.max_requests_per_s == 3
    assert config.api.max_body_bytes == 1048576
    assert config.schedule.interval == "15m"
    assert config.schedule.interval_seconds == 900
    assert config.schedule.cron is None
    assert config.schedule.jitter_s == 30
    assert config.logging.format == "json"
    assert config.logging.level == "info"

    justin, sean, lara, retired = config.accounts
    assert (justin.username, justin.enabled) == ("justin", True)
    assert justin.password == "justins-secret-pw"
    assert sean.password_sha1 == "5baa61e4c9b93f3f0682250b6cf8331b7ee68fd8"
    assert lara.api_version == 2
    assert lara.access_token == "lara-access-token-xyz"
    assert lara.refresh_token is None
    assert retired.enabled is False
    assert [config.version_of(a) for a in config.accounts] == [1, 1, 2, 1]
    assert [a.username for a in config.enabled_accounts()] == ["justin", "sean", "lara"]


def test_contract_example_takes_optional_secrets_when_set() -> None:
    """${VAR:-} values are used when the variables are set."""
    env = {**EXAMPLE_ENV, "TRAKT_CLIENT_SECRET": "client-secret-1", "LARA_REFRESH": "refresh-1"}
    config = parse_config(CONTRACT_EXAMPLE, env)
    assert config.api.client_secret == "client-secret-1"
    assert config.accounts[2].refresh_token == "refresh-1"


def test_contract_example_without_its_env_names_the_missing_variable() -> None:
    """The example with no environment fails at api.api_key, naming TRAKT_API_KEY."""
    error = config_error(CONTRACT_EXAMPLE)
    assert error.path == "api.api_key"
    assert error.message == "environment variable TRAKT_API_KEY is not set"
    assert error.exit_code == ExitCode.USAGE


# --- defaults -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_file_gives_all_defaults(text: str) -> None:
    """An empty document is an empty config with every default."""
    config = parse_config(text, {})
    assert config == Config()
    assert config.database.url == "sqlite:///trakt_etl.db"
    assert config.database.auto_migrate is True
    assert config.api.base_url == "https://api.trakt.tv"
    assert config.api.version == 1
    assert config.api.api_key is None
    assert config.api.client_secret is None
    assert (config.api.timeout_s, config.api.retries, config.api.concurrency) == (10, 4, 8)
    assert config.api.max_requests_per_s == 3
    assert config.api.max_body_bytes == 1048576
    assert config.schedule.interval == "15m"
    assert config.schedule.interval_seconds == 900
    assert config.schedule.cron is None
    assert config.schedule.jitter_s == 30
    assert config.logging.format is None
    assert config.logging.level == "info"
    assert config.accounts == []


def test_sections_with_nothing_under_them_are_defaults() -> None:
    """`api:` with every line commented out is an empty section, not a type error."""
    config = parse_config("database:\napi:\nschedule:\nlogging:\naccounts:\n", {})
    assert config == Config()


# --- interpolation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [({}, "fallback"), ({"KEY": ""}, "fallback"), ({"KEY": "from-env"}, "from-env")],
)
def test_interpolation_default_is_used_when_unset_or_empty(
    env: dict[str, str], expected: str
) -> None:
    """${VAR:-default} gives the default when VAR is unset or empty, as in a shell."""
    config = parse_config("api:\n  api_key: ${KEY:-fallback}\n", env)
    assert config.api.api_key == expected


def test_interpolation_set_but_empty_without_default_is_empty() -> None:
    """${VAR} with VAR set to "" is "", which an optional secret reads as not given."""
    config = parse_config("api:\n  client_secret: ${SECRET}\n", {"SECRET": ""})
    assert config.api.client_secret is None


def test_interpolation_embedded_several_per_string() -> None:
    """References work inside a longer string, several in one value."""
    env = {"HOST": "db.example", "USER": "etl"}
    text = "database:\n  url: postgresql+psycopg://${USER}@${HOST}:${PORT:-5432}/${DB:-trakt}\n"
    config = parse_config(text, env)
    assert config.database.url == "postgresql+psycopg://etl@db.example:5432/trakt"


def test_interpolation_missing_variable_names_the_key_path() -> None:
    """A missing variable is an error at the key that uses it."""
    text = API + (
        "accounts:\n"
        "  - username: a\n"
        "    password: x\n"
        "  - username: justin\n"
        "    password: ${JUSTIN_PASSWORD}\n"
    )
    error = config_error(text)
    assert error.path == "accounts[1].password"
    assert error.message == "environment variable JUSTIN_PASSWORD is not set"
    assert str(error) == "accounts[1].password: environment variable JUSTIN_PASSWORD is not set"


def test_interpolation_double_dollar_is_a_literal() -> None:
    """$${ is a literal ${ and is not looked up."""
    config = parse_config("api:\n  api_key: 'a$${NOT_A_VAR}b'\n", {})
    assert config.api.api_key == "a${NOT_A_VAR}b"


def test_interpolation_malformed_reference_is_an_error() -> None:
    """An unclosed or invalid ${ is reported rather than passed through."""
    error = config_error("api:\n  api_key: '${UNCLOSED'\n")
    assert error.path == "api.api_key"
    assert "$${" in error.message


@pytest.mark.parametrize(
    "value",
    ["yes", "123", "null", "[1, 2]", "{a: 1}", "x: y", "a\nretries: 99", "'quoted'", "# hash"],
)
def test_interpolated_yaml_looking_values_stay_strings(value: str) -> None:
    """A value with YAML syntax in it is one string and does not change the document."""
    text = API + "accounts:\n  - username: a\n    password: ${PW}\n"
    config = parse_config(text, {"PW": value})
    assert config.accounts[0].password == value
    assert config.api.retries == 4


def test_interpolated_numbers_and_booleans_are_coerced_for_typed_fields() -> None:
    """Lax mode: "7" from the environment fills an int field, "2" a version, "false" a bool."""
    text = (
        "api:\n  retries: ${RETRIES:-7}\n  version: ${VERSION:-2}\n"
        "database:\n  auto_migrate: ${MIGRATE:-false}\n"
    )
    config = parse_config(text, {})
    assert config.api.retries == 7
    assert config.api.version == 2
    assert config.database.auto_migrate is False


def test_interpolation_leaves_keys_and_comments_alone() -> None:
    """Only string values are interpolated: a reference in a comment needs no variable."""
    config = parse_config("api:  # see ${UNSET_IN_COMMENT}\n  retries: 1\n", {})
    assert config.api.retries == 1


# --- unknown keys, wrong types, ranges ------------------------------------------------------


TWO_ACCOUNTS_ONE_MISSPELT = API + (
    "accounts:\n  - {username: a, password: x}\n  - {username: b, pasword: y}\n"
)


@pytest.mark.parametrize(
    ("text", "path", "key"),
    [
        ("api:\n  timeot_s: 3\n", "api.timeot_s", "timeot_s"),
        ("databse:\n  url: sqlite://\n", "databse", "databse"),
        (TWO_ACCOUNTS_ONE_MISSPELT, "accounts[1].pasword", "pasword"),
        ("schedule:\n  every: 5m\n", "schedule.every", "every"),
    ],
)
def test_unknown_key_is_an_error_at_its_path(text: str, path: str, key: str) -> None:
    """An unknown key is refused with its path and name."""
    error = config_error(text)
    assert error.path == path
    assert error.message.startswith(f"unknown key '{key}'")


def test_unknown_key_suggests_the_close_one() -> None:
    """A misspelt key points at the key that was probably meant."""
    error = config_error("api:\n  timeot_s: 3\n")
    assert error.message == "unknown key 'timeot_s' (did you mean 'timeout_s'?)"


def test_non_string_key_is_an_unknown_key() -> None:
    """A numeric key is reported as an unknown key, not a cryptic type error."""
    error = config_error("1: x\n")
    assert (error.path, error.message) == ("1", "unknown key '1'")


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("api:\n  timeout_s: fast\n", "api.timeout_s"),
        ("api:\n  retries: 1.5\n", "api.retries"),
        ("api:\n  version: 3\n", "api.version"),
        ("database:\n  auto_migrate: maybe\n", "database.auto_migrate"),
        ("api: 5\n", "api"),
        ("accounts:\n  username: a\n", "accounts"),
        (API + "accounts:\n  - {username: a, api_version: 7}\n", "accounts[0].api_version"),
        (API + "accounts:\n  - {username: a, enabled: sometimes}\n", "accounts[0].enabled"),
        ("logging:\n  format: xml\n", "logging.format"),
    ],
)
def test_wrong_type_is_an_error_at_its_path(text: str, path: str) -> None:
    """A value of the wrong type is refused at its key path with pydantic's message."""
    error = config_error(text)
    assert error.path == path
    assert error.message.startswith("Input should be")


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("api:\n  timeout_s: 0\n", "api.timeout_s"),
        ("api:\n  retries: -1\n", "api.retries"),
        ("api:\n  concurrency: 0\n", "api.concurrency"),
        ("api:\n  max_requests_per_s: 0\n", "api.max_requests_per_s"),
        ("api:\n  max_body_bytes: 1023\n", "api.max_body_bytes"),
        ("schedule:\n  jitter_s: -1\n", "schedule.jitter_s"),
        ("api:\n  fetch_processes: -1\n", "api.fetch_processes"),
    ],
)
def test_out_of_range_number_is_an_error_at_its_path(text: str, path: str) -> None:
    """Numbers outside their allowed range are refused at their key path."""
    assert config_error(text).path == path


def test_several_problems_are_all_named() -> None:
    """The first problem is the error; the message lists the other paths."""
    error = config_error("api:\n  timeout_s: x\n  retries: -1\n")
    assert error.path == "api.timeout_s"
    assert "1 more: api.retries" in error.message


def test_wrong_type_message_does_not_echo_the_value() -> None:
    """A mistyped secret is not repeated in the error."""
    text = API + "accounts:\n  - username: a\n    password: [hunter2-secret]\n"
    error = config_error(text)
    assert error.path == "accounts[0].password"
    assert "hunter2" not in str(error)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://api.trakt.tv/", "https://api.trakt.tv"),
        ("http://127.0.0.1:8080//", "http://127.0.0.1:8080"),
        ("https://proxy.example/trakt/", "https://proxy.example/trakt"),
    ],
)
def test_base_url_loses_its_trailing_slash(url: str, expected: str) -> None:
    """api.base_url is stored without a trailing slash."""
    config = parse_config(f"api:\n  base_url: '{url}'\n", {})
    assert config.api.base_url == expected


@pytest.mark.parametrize("url", ["ftp://api.trakt.tv", "api.trakt.tv", "https://", ""])
def test_base_url_must_be_http(url: str) -> None:
    """api.base_url must be an http(s) URL with a host."""
    assert config_error(f"api:\n  base_url: '{url}'\n").path == "api.base_url"


def test_database_url_must_parse_and_is_not_echoed() -> None:
    """A malformed database URL is refused without repeating it (it may hold a password)."""
    error = config_error("database:\n  url: 'not a url s3cret'\n")
    assert error.path == "database.url"
    assert "s3cret" not in str(error)


@pytest.mark.parametrize(("given", "stored"), [("DEBUG", "debug"), ("Warning", "warning")])
def test_log_level_is_case_insensitive_and_stored_lower_case(given: str, stored: str) -> None:
    """logging.level accepts any case and keeps lower case."""
    assert parse_config(f"logging:\n  level: {given}\n", {}).logging.level == stored


def test_unknown_log_level_is_an_error() -> None:
    """logging.level must be a known level."""
    error = config_error("logging:\n  level: loud\n")
    assert error.path == "logging.level"
    assert "debug" in error.message


def test_log_format_console_is_accepted() -> None:
    """logging.format takes json or console, in any case."""
    assert parse_config("logging:\n  format: Console\n", {}).logging.format == "console"


# --- accounts -------------------------------------------------------------------------------


def test_duplicate_username_is_an_error_at_the_later_one() -> None:
    """A repeated username is refused at the later entry, naming the earlier index."""
    text = API + (
        "accounts:\n"
        "  - {username: justin, password: a}\n"
        "  - {username: sean, password: b}\n"
        "  - {username: justin, password: c}\n"
    )
    error = config_error(text)
    assert error.path == "accounts[2].username"
    assert "accounts[0]" in error.message


def test_duplicate_username_ignores_case() -> None:
    """Usernames differing only in case are the same trakt account."""
    text = (
        API + "accounts:\n  - {username: Justin, password: a}\n  - {username: justin, password: b}"
    )
    assert config_error(text).path == "accounts[1].username"


@pytest.mark.parametrize("username", ["''", "'a b'", "'tab\tname'"])
def test_username_must_be_non_empty_without_whitespace(username: str) -> None:
    """A username is non-empty and has no whitespace."""
    text = API + f"accounts:\n  - username: {username}\n    password: x\n"
    assert config_error(text).path == "accounts[0].username"


def test_username_is_required() -> None:
    """An account without a username is refused at its username."""
    text = API + "accounts:\n  - password: x\n"
    assert config_error(text).path == "accounts[0].username"


def test_v1_account_needs_a_password() -> None:
    """An enabled v1 account without password or password_sha1 is an error at its password."""
    text = API + "accounts:\n  - {username: a, password: x}\n  - {username: b}\n"
    error = config_error(text)
    assert error.path == "accounts[1].password"
    assert "password_sha1" in error.message


def test_v1_account_with_both_passwords_is_an_error() -> None:
    """password and password_sha1 together are refused at the password."""
    text = API + (
        "accounts:\n  - username: a\n    password: x\n"
        "    password_sha1: 5baa61e4c9b93f3f0682250b6cf8331b7ee68fd8\n"
    )
    error = config_error(text)
    assert error.path == "accounts[0].password"
    assert "5baa61e4" not in str(error)


def test_empty_password_counts_as_missing() -> None:
    """password: ${PW:-} with PW unset is no password at all."""
    text = API + "accounts:\n  - {username: a, password: '${PW:-}'}\n"
    assert config_error(text).path == "accounts[0].password"


def test_v2_account_needs_an_access_token() -> None:
    """An enabled v2 account without access_token is an error at its access_token."""
    text = API + "accounts:\n  - {username: lara, api_version: 2, password: x}\n"
    error = config_error(text)
    assert error.path == "accounts[0].access_token"


def test_global_v2_applies_to_accounts_without_an_override() -> None:
    """api.version 2 makes every account without api_version need an access token."""
    text = "api:\n  api_key: k\n  version: 2\naccounts:\n  - {username: a, access_token: t}\n"
    config = parse_config(text, {})
    assert config.version_of(config.accounts[0]) == 2
    text_v1_creds = "api:\n  api_key: k\n  version: 2\naccounts:\n  - {username: a, password: p}\n"
    assert config_error(text_v1_creds).path == "accounts[0].access_token"


def test_disabled_account_needs_no_credentials() -> None:
    """A disabled account is valid without any credentials."""
    config = parse_config(API + "accounts:\n  - {username: old, enabled: false}\n", {})
    assert config.enabled_accounts() == []
    assert config.accounts[0].secrets() == set()


def test_api_key_is_required_with_an_enabled_account() -> None:
    """An enabled account needs a non-empty api.api_key."""
    error = config_error("accounts:\n  - {username: a, password: x}\n")
    assert error.path == "api.api_key"
    text = "api:\n  api_key: ${KEY:-}\naccounts:\n  - {username: a, password: x}\n"
    assert config_error(text).path == "api.api_key"


def test_api_key_is_optional_when_every_account_is_disabled() -> None:
    """With no enabled account there is nothing to fetch, so no api key is needed."""
    config = parse_config("accounts:\n  - {username: a, enabled: false}\n", {})
    assert config.api.api_key is None


def test_password_sha1_is_stored_lower_case() -> None:
    """password_sha1 accepts upper-case hex and keeps it lower-case."""
    upper = "5BAA61E4C9B93F3F0682250B6CF8331B7EE68FD8"
    text = API + f"accounts:\n  - {{username: a, password_sha1: {upper}}}\n"
    config = parse_config(text, {})
    assert config.accounts[0].password_sha1 == "5baa61e4c9b93f3f0682250b6cf8331b7ee68fd8"


@pytest.mark.parametrize(
    "value", ["5baa61e4", "5baa61e4c9b93f3f0682250b6cf8331b7ee68fd8aa", "z" * 40, "'password123'"]
)
def test_bad_password_sha1_is_an_error_without_its_value(value: str) -> None:
    """password_sha1 must be 40 hex characters; the message does not repeat it."""
    text = API + f"accounts:\n  - username: a\n    password_sha1: {value}\n"
    error = config_error(text)
    assert error.path == "accounts[0].password_sha1"
    assert value.strip("'") not in str(error)


def test_version_override_accepts_text_from_the_environment() -> None:
    """api_version: ${V} with V="2" is version 2."""
    text = API + "accounts:\n  - {username: a, api_version: '${V}', access_token: t}\n"
    config = parse_config(text, {"V": "2"})
    assert config.accounts[0].api_version == 2


# --- the schedule ---------------------------------------------------------------------------


def test_cron_schedule_is_accepted() -> None:
    """A five-field cron line is valid and leaves interval unset."""
    config = parse_config("schedule:\n  cron: '*/15  * * * *'\n", {})
    assert config.schedule.cron == "*/15 * * * *"
    assert config.schedule.interval is None
    assert config.schedule.interval_seconds is None


@pytest.mark.parametrize(
    "cron", ["* * *", "* * * * * *", "99 * * * *", "*/0 * * * *", "a b c d e", "@daily", ""]
)
def test_bad_cron_is_an_error_saying_what_is_expected(cron: str) -> None:
    """A cron line that is not five valid fields is refused at schedule.cron."""
    error = config_error(f"schedule:\n  cron: '{cron}'\n")
    assert error.path == "schedule.cron"
    assert "five-field" in error.message


@pytest.mark.parametrize("interval", ["15x", "m", "15", "-5m", "0s", "1.5s", "fifteen minutes"])
def test_bad_interval_is_an_error_saying_what_is_expected(interval: str) -> None:
    """A bad interval is refused at schedule.interval, explaining the form."""
    error = config_error(f"schedule:\n  interval: '{interval}'\n")
    assert error.path == "schedule.interval"
    assert "30s" in error.message or "whole number" in error.message


def test_bare_number_interval_asks_for_a_unit() -> None:
    """interval: 900 (no unit) is refused with a hint to add one."""
    error = config_error("schedule:\n  interval: 900\n")
    assert error.path == "schedule.interval"
    assert "unit" in error.message


def test_interval_and_cron_together_are_an_error() -> None:
    """Giving both interval and cron is an error at `schedule`."""
    error = config_error("schedule:\n  interval: 5m\n  cron: '*/5 * * * *'\n")
    assert error.path == "schedule"
    assert "not both" in error.message


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("15m", 900),
        ("1h", 3600),
        ("2d", 172800),
        ("1s", 1),
        (" 10 m ", 600),
        ("1.5h", 5400),
        ("0.5m", 30),
    ],
)
def test_parse_interval_gives_seconds(text: str, seconds: int) -> None:
    """parse_interval turns a number with a unit into seconds."""
    assert parse_interval(text) == seconds


@pytest.mark.parametrize("text", ["", "15", "15x", "m", "1w", "-1m", "0m", "0.1s", "15M", "1h30m"])
def test_parse_interval_rejects_other_forms(text: str) -> None:
    """parse_interval raises ValueError, naming the expected form."""
    with pytest.raises(ValueError, match=r"invalid interval"):
        parse_interval(text)


# --- YAML-level errors ----------------------------------------------------------------------


def test_invalid_yaml_names_the_line() -> None:
    """A YAML syntax error says on which line, without quoting it."""
    error = config_error("api:\n  retries: 4\n  api_key: secret-value: oops\n")
    assert error.path is None
    assert "line 3" in error.message
    assert "secret-value" not in str(error)


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "list"), ("just text\n", "string")])
def test_top_level_must_be_a_mapping(text: str, kind: str) -> None:
    """A document that is not a mapping is refused."""
    error = config_error(text)
    assert "mapping" in error.message
    assert kind in error.message


def test_duplicate_yaml_key_is_an_error() -> None:
    """A key given twice is refused (YAML would silently keep the last)."""
    error = config_error("accounts: []\napi:\n  retries: 1\n  retries: 2\n")
    assert error.path == "api.retries"
    assert "line 3" in error.message


def test_python_tags_are_refused() -> None:
    """safe_load: a python object tag is a YAML error, never code."""
    error = config_error("api: !!python/object/apply:os.system ['true']\n")
    assert "invalid YAML" in error.message


def test_yaml_anchors_and_merge_keys_work() -> None:
    """Aliases and merge keys are ordinary YAML and are allowed."""
    text = API + (
        "accounts:\n"
        "  - &base {username: a, password: x, api_version: 1}\n"
        "  - {<<: *base, username: b}\n"
    )
    config = parse_config(text, {})
    assert [a.username for a in config.accounts] == ["a", "b"]
    assert config.accounts[1].password == "x"


def test_duplicate_top_level_section_is_an_error() -> None:
    """A section given twice is refused at its key, with the line of the first."""
    error = config_error("api:\n  retries: 1\naccounts: []\napi:\n  retries: 2\n")
    assert error.path == "api"
    assert "line 1" in error.message


def test_top_level_merge_key_adds_sections_it_does_not_override() -> None:
    """`<<:` at the top merges its mapping's sections, explicit ones winning."""
    text = API + "<<: {logging: {level: debug}, api: {retries: 9}}\n"
    config = parse_config(text, {})
    assert config.logging.level == "debug"
    assert config.api.retries == 4  # api was given explicitly
    assert config.api.api_key == "the-api-key"


def test_anchored_account_list_is_read_whole_and_validated() -> None:
    """An anchored `accounts:` sequence (not streamed) gives the same accounts."""
    text = API + "accounts: &all\n  - {username: a, password: x}\n  - {username: b, password: y}\n"
    assert [a.username for a in parse_config(text, {}).accounts] == ["a", "b"]


def test_several_yaml_documents_are_an_error() -> None:
    """One config file, one document."""
    error = config_error(API + "---\nlogging: {level: debug}\n")
    assert "one YAML document" in error.message


def test_missing_variable_reported_is_the_first_in_the_file() -> None:
    """Sections are read in order: an earlier missing variable is the one named."""
    text = "api:\n  api_key: ${KEY}\naccounts:\n  - username: a\n    password: ${PW}\n"
    assert config_error(text).path == "api.api_key"
    assert config_error(text, {"KEY": "k"}).path == "accounts[0].password"


def test_a_big_account_list_is_read_one_account_at_a_time() -> None:
    """Reading 20,000 accounts never holds the file's whole node graph: the peak of the
    memory allocated while parsing stays within a small multiple of what is kept."""
    text = API + "accounts:\n" + "".join(
        f"  - username: user{n:05d}\n    password: pw-user{n:05d}\n" for n in range(20_000)
    )
    tracemalloc.start()
    try:
        config = parse_config(text, {})
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(config.accounts) == 20_000
    assert peak < 2 * kept + len(text), (peak, kept)


def test_recursive_yaml_alias_is_an_error() -> None:
    """A node containing itself is refused, not a crash."""
    error = config_error("accounts: &x [*x]\n")
    assert error.path == "accounts[0]"


# --- the file, its path and the environment -------------------------------------------------


def test_load_config_reads_the_file(tmp_path: Path) -> None:
    """load_config parses the file at the path it is given."""
    path = tmp_path / "trakt.yaml"
    path.write_text(CONTRACT_EXAMPLE, encoding="utf-8")
    config = load_config(path, EXAMPLE_ENV)
    assert len(config.accounts) == 4


def test_load_config_missing_file_says_how_to_give_another(tmp_path: Path) -> None:
    """A missing file is an error naming the path, --config and TRAKT_ETL_CONFIG."""
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    message = str(caught.value)
    assert str(path) in message
    assert "--config" in message
    assert "TRAKT_ETL_CONFIG" in message


def test_load_config_unreadable_path_is_a_config_error(tmp_path: Path) -> None:
    """A directory where the file should be is a ConfigError, not an OSError."""
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path, {})


def test_load_config_yaml_error_names_the_file(tmp_path: Path) -> None:
    """YAML errors name the file they come from."""
    path = tmp_path / "bad.yaml"
    path.write_text("api: [\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.yaml"):
        load_config(path, {})


def test_env_database_url_overrides_the_file() -> None:
    """TRAKT_ETL_DATABASE_URL replaces database.url, keeping the other database keys."""
    text = "database:\n  url: sqlite:///file.db\n  auto_migrate: false\n"
    config = parse_config(text, {"TRAKT_ETL_DATABASE_URL": "postgresql+psycopg://u@h/db"})
    assert config.database.url == "postgresql+psycopg://u@h/db"
    assert config.database.auto_migrate is False


def test_env_database_url_applies_without_a_database_section() -> None:
    """The override works when the file has no database section."""
    config = parse_config("", {"TRAKT_ETL_DATABASE_URL": "sqlite:///other.db"})
    assert config.database.url == "sqlite:///other.db"


def test_env_database_url_wins_over_an_unset_variable_in_the_file() -> None:
    """An interpolated database.url is replaced after interpolation; empty override is ignored."""
    text = "database:\n  url: ${DB_URL:-sqlite:///default.db}\n"
    assert parse_config(text, {"TRAKT_ETL_DATABASE_URL": "sqlite:///env.db"}).database.url == (
        "sqlite:///env.db"
    )
    assert parse_config(text, {"TRAKT_ETL_DATABASE_URL": ""}).database.url == (
        "sqlite:///default.db"
    )


def test_resolve_config_path_prefers_the_command_line() -> None:
    """--config wins over TRAKT_ETL_CONFIG."""
    env = {"TRAKT_ETL_CONFIG": "/etc/from-env.yaml"}
    assert resolve_config_path("conf/cli.yaml", env) == Path("conf/cli.yaml")


def test_resolve_config_path_uses_the_environment_next() -> None:
    """Without --config, TRAKT_ETL_CONFIG is used."""
    env = {"TRAKT_ETL_CONFIG": "/etc/from-env.yaml"}
    assert resolve_config_path(None, env) == Path("/etc/from-env.yaml")


@pytest.mark.parametrize("env", [{}, {"TRAKT_ETL_CONFIG": ""}])
def test_resolve_config_path_defaults_to_config_yaml(env: dict[str, str]) -> None:
    """With neither, the path is ./config.yaml."""
    assert resolve_config_path(None, env) == DEFAULT_CONFIG_PATH == Path("config.yaml")


# --- secrets --------------------------------------------------------------------------------


def test_password_sha1_hex_from_a_password() -> None:
    """A plain password gives its SHA-1 hex (the contract's sean is sha1('password'))."""
    account = AccountConfig(username="a", password="password")
    assert account.password_sha1_hex() == "5baa61e4c9b93f3f0682250b6cf8331b7ee68fd8"


def test_password_sha1_hex_as_given() -> None:
    """A password_sha1 is returned as given (lower-cased)."""
    account = AccountConfig(username="a", password_sha1="5BAA61E4C9B93F3F0682250B6CF8331B7EE68FD8")
    assert account.password_sha1_hex() == "5baa61e4c9b93f3f0682250b6cf8331b7ee68fd8"


def test_password_sha1_hex_without_a_password_is_none() -> None:
    """An account with no password has no SHA-1."""
    assert AccountConfig(username="a", access_token="t").password_sha1_hex() is None


def test_password_sha1_hex_of_non_ascii_password_uses_utf8() -> None:
    """Non-ASCII passwords are hashed as UTF-8."""
    account = AccountConfig(username="a", password="pässwörd")
    assert account.password_sha1_hex() == hashlib.sha1("pässwörd".encode()).hexdigest()


def all_example_secrets() -> tuple[Config, set[str]]:
    """The contract's example with every secret set, and the set of those secrets."""
    env = {
        **EXAMPLE_ENV,
        "TRAKT_CLIENT_SECRET": "client-secret-abc",
        "LARA_REFRESH": "lara-refresh-token-def",
        "TRAKT_ETL_DATABASE_URL": "postgresql+psycopg://etl:db-pass-42@db/trakt",
    }
    config = parse_config(CONTRACT_EXAMPLE, env)
    expected = {
        "db-pass-42",
        "api-key-0123456789",
        "client-secret-abc",
        "justins-secret-pw",
        hashlib.sha1(b"justins-secret-pw").hexdigest(),
        "5baa61e4c9b93f3f0682250b6cf8331b7ee68fd8",
        "lara-access-token-xyz",
        "lara-refresh-token-def",
    }
    return config, expected


def test_secrets_lists_every_secret() -> None:
    """Config.secrets() holds the api key, client secret, passwords, their SHA-1s and tokens."""
    config, expected = all_example_secrets()
    assert config.secrets() == expected


def test_secrets_skip_empty_values() -> None:
    """Unset and empty secrets are not in secrets()."""
    config = parse_config(CONTRACT_EXAMPLE, EXAMPLE_ENV)
    assert "" not in config.secrets()
    assert None not in config.secrets()


def test_secrets_include_the_database_password() -> None:
    """A password inside the database URL is a secret too."""
    text = "database:\n  url: postgresql+psycopg://etl:db-pass-42@db/trakt\n"
    assert parse_config(text, {}).secrets() == {"db-pass-42"}


def test_masked_contains_no_secret() -> None:
    """No secret value appears anywhere in json.dumps(config.masked())."""
    config, expected = all_example_secrets()
    dumped = json.dumps(config.masked())
    for secret in expected:
        assert secret not in dumped, secret


def test_masked_keeps_the_rest_and_marks_given_secrets() -> None:
    """masked() is the resolved config as plain data with secrets as ***."""
    config, _ = all_example_secrets()
    masked = config.masked()
    assert masked["api"]["api_key"] == MASK
    assert masked["api"]["client_secret"] == MASK
    assert masked["api"]["timeout_s"] == 10
    assert masked["schedule"]["interval"] == "15m"
    assert masked["database"]["url"] == "postgresql+psycopg://etl:***@db/trakt"
    assert masked["database"]["auto_migrate"] is True
    justin, sean, lara, retired = masked["accounts"]
    assert (justin["username"], justin["password"], justin["password_sha1"]) == (
        "justin",
        MASK,
        None,
    )
    assert sean["password_sha1"] == MASK
    assert (lara["access_token"], lara["refresh_token"]) == (MASK, MASK)
    assert retired == {
        "username": "retired",
        "enabled": False,
        "api_version": None,
        "password": None,
        "password_sha1": None,
        "access_token": None,
        "refresh_token": None,
    }
    json.dumps(masked)  # plain data


def test_masked_hides_a_secret_pasted_into_another_value() -> None:
    """A secret that also appears in a non-secret value is masked there too."""
    text = "api:\n  api_key: pasted-key\n  base_url: https://proxy.example/pasted-key\n"
    masked = parse_config(text, {}).masked()
    assert masked["api"]["base_url"] == "https://proxy.example/***"


def test_repr_does_not_show_secrets() -> None:
    """repr() of a config (in a traceback, say) shows no secret."""
    config, expected = all_example_secrets()
    shown = repr(config)
    for secret in expected:
        assert secret not in shown


# --- immutability ---------------------------------------------------------------------------


def test_config_is_frozen() -> None:
    """Config and its sections cannot be changed after loading."""
    config = parse_config(CONTRACT_EXAMPLE, EXAMPLE_ENV)
    with pytest.raises(ValidationError):
        config.api.retries = 9  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.accounts[0].password = "x"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        config.database = config.database  # type: ignore[misc]


@pytest.mark.parametrize(("given", "parsed"), [("", "auto"), ("auto", "auto"), ("0", 0), ("2", 2)])
def test_fetch_processes_is_auto_or_a_count(given: str, parsed: object) -> None:
    """api.fetch_processes: "auto" (the default) or a number of processes, 0 for none."""
    text = f"api:\n  fetch_processes: {given}\n" if given else ""
    assert parse_config(text, {}).api.fetch_processes == parsed


def test_fetch_processes_refuses_other_words() -> None:
    """A word other than auto is an error at the key."""
    assert config_error("api:\n  fetch_processes: many\n").path == "api.fetch_processes"
