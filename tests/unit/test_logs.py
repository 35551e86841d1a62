"""Unit tests for etl.logs: JSON and console log lines, with secrets never shown."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import datetime
from io import StringIO
from typing import Any

import pytest
import structlog

from etl.logs import choose_format, configure_logging, get_logger
from etl.redact import MASK, account_secrets

SECRET = "hunter2-very-secret"
API_KEY = "0123456789abcdef-apikey"

Configure = Callable[..., StringIO]


@pytest.fixture
def configure() -> Iterator[Configure]:
    """Configure logging into a fresh buffer; structlog is reset after the test."""

    def _configure(**options: Any) -> StringIO:
        out = StringIO()
        options.setdefault("secrets", {SECRET, API_KEY})
        configure_logging(stream=out, **options)
        return out

    yield _configure
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()


def _json_lines(out: StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def _fail_with_secret_in_a_local() -> None:
    password = SECRET
    raise RuntimeError(f"login refused for {password}")


def test_json__one_object_per_line_with_event_timestamp_level(configure: Configure) -> None:
    """Each event is one JSON object on its own line with event, timestamp and level."""
    out = configure(format="json")
    log = get_logger("test")

    log.info("run.started", accounts=3)
    log.warning("account.failed", error_kind="timeout")

    lines = _json_lines(out)
    assert len(out.getvalue().splitlines()) == 2
    assert [(line["event"], line["level"]) for line in lines] == [
        ("run.started", "info"),
        ("account.failed", "warning"),
    ]
    assert lines[0]["accounts"] == 3
    assert all("timestamp" in line for line in lines)


def test_json__timestamp_is_iso_8601_utc(configure: Configure) -> None:
    """The timestamp is ISO-8601 in UTC."""
    out = configure(format="json")

    get_logger().info("run.started")

    stamp = _json_lines(out)[0]["timestamp"]
    assert stamp.endswith(("Z", "+00:00"))
    parsed = datetime.fromisoformat(stamp)
    assert parsed.utcoffset() is not None
    assert parsed.utcoffset().total_seconds() == 0  # type: ignore[union-attr]


def test_json__bound_context_appears_only_while_bound(configure: Configure) -> None:
    """Bound context vars (run_id, username) appear in lines logged within their binding."""
    out = configure(format="json")
    log = get_logger()

    with structlog.contextvars.bound_contextvars(run_id=1, username="justin"):
        log.info("account.synced", changed=False)
    log.info("run.finished")

    inside, after = _json_lines(out)
    assert (inside["run_id"], inside["username"]) == (1, "justin")
    assert "run_id" not in after
    assert "username" not in after


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"url": f"https://api.trakt.tv/account/settings/{API_KEY}"},
            {"url": f"https://api.trakt.tv/account/settings/{MASK}"},
        ),
        ({"error": f"bad {SECRET}, bad {SECRET}"}, {"error": f"bad {MASK}, bad {MASK}"}),
        ({"request": {"body": {"pw": SECRET}}}, {"request": {"body": {"pw": MASK}}}),
        ({"items": ["ok", SECRET, {"x": [API_KEY]}]}, {"items": ["ok", MASK, {"x": [MASK]}]}),
        ({"pair": ("ok", SECRET)}, {"pair": ["ok", MASK]}),
    ],
)
def test_json__secret_in_any_string_is_masked(
    configure: Configure, fields: dict[str, Any], expected: dict[str, Any]
) -> None:
    """A known secret inside a string value, a nested dict or a list is masked."""
    out = configure(format="json")

    get_logger().info("http.request", **fields)

    line = _json_lines(out)[0]
    assert {key: line[key] for key in expected} == expected
    assert SECRET not in out.getvalue()
    assert API_KEY not in out.getvalue()


@pytest.mark.parametrize(
    "secret",
    ['pa"ss\\word', "tab\there", "naïve-pässwörd", "line\nbreak"],
    ids=["quote-and-backslash", "tab", "non-ascii", "newline"],
)
def test_json__secret_that_json_escapes_is_still_masked(configure: Configure, secret: str) -> None:
    """A secret with characters JSON escapes is found in the line as rendered, and masked."""
    out = configure(format="json", secrets={secret})

    get_logger().info("account.changed", changes=[{"new": {"about": f"x {secret} y"}}])

    line = _json_lines(out)[0]
    assert line["changes"] == [{"new": {"about": f"x {MASK} y"}}]
    assert secret not in json.dumps(line, ensure_ascii=False)


def test_json__line_without_secrets_keeps_every_value(configure: Configure) -> None:
    """Nothing is masked when no secret appears: values survive exactly, types included."""
    out = configure(format="json")
    values = {"about": "O'Brien \"quoted\" ✓", "age": 31, "vip": True, "gone": None}

    get_logger().info("account.changed", changes=[{"new": values}], changed=True)

    line = _json_lines(out)[0]
    assert line["changes"] == [{"new": values}]
    assert line["changed"] is True


def test_json__secret_in_the_event_text_is_masked(configure: Configure) -> None:
    """Even the event text is redacted."""
    out = configure(format="json")

    get_logger().info(f"oops {SECRET}")

    assert _json_lines(out)[0]["event"] == f"oops {MASK}"


def test_json__secret_in_a_non_string_value_is_masked(configure: Configure) -> None:
    """An object logged as a value (an exception, a set) does not leak a secret via its text."""
    out = configure(format="json")

    get_logger().warning("account.failed", error=ValueError(f"bad {SECRET}"), keys={API_KEY})

    line = _json_lines(out)[0]
    assert SECRET not in out.getvalue()
    assert API_KEY not in out.getvalue()
    assert line["error"] == f"bad {MASK}"


@pytest.mark.parametrize(
    "key",
    [
        "password",
        "password_sha1",
        "access_token",
        "refresh_token",
        "api_key",
        "apikey",
        "client_secret",
        "Authorization",
    ],
)
def test_json__secret_named_keys_are_masked(configure: Configure, key: str) -> None:
    """A value under a key named like a secret is masked even if it is not a known secret."""
    out = configure(format="json")

    get_logger().info("config.loaded", **{key: "not-registered-value", "nested": {key: "x1y2"}})

    line = _json_lines(out)[0]
    assert line[key] == MASK
    assert line["nested"][key] == MASK
    assert "not-registered-value" not in out.getvalue()


def test_json__account_secrets_masked_inside_their_block(configure: Configure) -> None:
    """Secrets of the account at hand are masked in lines logged within `account_secrets`."""
    out = configure(format="json", secrets=())
    log = get_logger()

    with account_secrets(["pw-of-justin"]):
        log.info("account.fetching", note="sent pw-of-justin")
    log.info("account.other", note="pw-of-justin")

    inside, after = _json_lines(out)
    assert inside["note"] == f"sent {MASK}"
    assert after["note"] == "pw-of-justin"


def test_json__exception_traceback_has_no_secret_and_no_locals(configure: Configure) -> None:
    """A logged exception keeps its traceback but neither the secret nor local variables."""
    out = configure(format="json")

    try:
        _fail_with_secret_in_a_local()
    except RuntimeError:
        get_logger().exception("account.internal_error")

    text = out.getvalue()
    assert SECRET not in text
    (line,) = _json_lines(out)
    assert line["level"] == "error"
    (exception,) = line["exception"]
    assert exception["exc_type"] == "RuntimeError"
    assert exception["exc_value"] == f"login refused for {MASK}"
    assert [frame["name"] for frame in exception["frames"]][-1] == "_fail_with_secret_in_a_local"
    assert all("locals" not in frame for frame in exception["frames"])


def test_console__renders_events_with_secrets_masked(configure: Configure) -> None:
    """The console format prints readable lines, masking secrets and secret-named keys."""
    out = configure(format="console")
    log = get_logger()

    with structlog.contextvars.bound_contextvars(run_id=7):
        log.info("account.synced", url=f"https://x/{API_KEY}", password="plain-pw-value")

    text = out.getvalue()
    assert "account.synced" in text
    assert "run_id=7" in text
    assert f"https://x/{MASK}" in text
    assert API_KEY not in text
    assert "plain-pw-value" not in text


def test_console__exception_traceback_has_no_secret(configure: Configure) -> None:
    """A logged exception in console format shows the traceback with the secret masked."""
    out = configure(format="console")

    try:
        _fail_with_secret_in_a_local()
    except RuntimeError:
        get_logger().exception("account.internal_error")

    text = out.getvalue()
    assert "Traceback" in text
    assert f"RuntimeError: login refused for {MASK}" in text
    assert SECRET not in text


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_level__events_below_the_level_are_dropped(configure: Configure, fmt: str) -> None:
    """Only events at or above the configured level are written."""
    out = configure(format=fmt, level="warning")
    log = get_logger()

    log.debug("a.debug")
    log.info("a.info")
    log.warning("a.warning")
    log.error("a.error")

    text = out.getvalue()
    assert "a.debug" not in text
    assert "a.info" not in text
    assert "a.warning" in text
    assert "a.error" in text


def test_level__debug_shows_debug_events(configure: Configure) -> None:
    """At level debug, debug events are written too."""
    out = configure(format="json", level="DEBUG")

    get_logger().debug("a.debug")

    assert [line["event"] for line in _json_lines(out)] == ["a.debug"]


def test_choose_format__request_wins_else_json_off_a_terminal() -> None:
    """An explicit format is used; with none, a non-terminal stream gets JSON."""
    assert choose_format("console", StringIO()) == "console"
    assert choose_format(None, StringIO()) == "json"
