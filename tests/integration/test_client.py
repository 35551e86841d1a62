"""The HTTP client against the fake API: retries, pacing, and what counts as final."""

from __future__ import annotations

import itertools
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from etl.client import TraktClient
from etl.config import AccountConfig, Config
from etl.errors import FetchError
from etl.fakeapi import DEFAULT_API_KEY, FakeTrakt, Fault, password_for
from etl.ratelimit import RequestGate
from etl.redact import Redactor

pytestmark = pytest.mark.integration


def config_for(fake: FakeTrakt, users: list[str], **api: Any) -> Config:
    return Config.model_validate(
        {
            "api": {
                "base_url": fake.base_url,
                "api_key": DEFAULT_API_KEY,
                "max_requests_per_s": 10_000,
                "backoff_initial_s": 0.01,
                "backoff_max_s": 0.05,
                **api,
            },
            "accounts": [{"username": u, "password": password_for(u)} for u in users],
        }
    )


def busiest_second(stamps: list[float]) -> int:
    stamps = sorted(stamps)
    return max(sum(1 for s in stamps if start <= s < start + 1.0) for start in stamps)


def test_rate_limit__holds_across_workers(fake_api: FakeTrakt) -> None:
    """At 20 requests/s, 200 accounts on 16 threads take ~9 s and never exceed 20 in a second."""
    users = fake_api.add_generated(200)
    config = config_for(fake_api, users, max_requests_per_s=20, concurrency=16)
    client = TraktClient(config.api)
    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda a: client.fetch(a, 1), config.accounts))
    elapsed = time.monotonic() - started
    client.close()

    assert len(results) == 200
    # The limiter paces 2 requests per 110 ms (20/s less 10%): the 200th request leaves in the
    # 100th slice, ~10.9 s in; 9 s leaves room for timer slack without letting a burst through.
    assert elapsed >= 9.0
    assert busiest_second(fake_api.request_times()) <= 20


@pytest.mark.parametrize("status", [400, 401, 403, 404, 501])
def test_final_http_errors__are_not_retried(fake_api: FakeTrakt, status: int) -> None:
    """4xx (and a 5xx outside the retry list) fail on the first answer."""
    fake_api.add_account("justin")
    fake_api.inject("justin", Fault.http(status))
    config = config_for(fake_api, ["justin"], retries=4)

    with pytest.raises(FetchError) as failure:
        TraktClient(config.api).fetch(config.accounts[0], 1)

    assert failure.value.attempts == 1
    assert failure.value.http_status == status
    assert fake_api.request_count("justin") == 1


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504, 520, 521, 522, 523, 524])
def test_transient_http_errors__are_retried_up_to_the_limit(
    fake_api: FakeTrakt, status: int
) -> None:
    """Retryable statuses get `retries` more attempts, then fail with the count."""
    fake_api.add_account("justin")
    fake_api.inject("justin", Fault.http(status))
    config = config_for(fake_api, ["justin"], retries=3)

    with pytest.raises(FetchError) as failure:
        TraktClient(config.api).fetch(config.accounts[0], 1)

    assert failure.value.attempts == 4
    assert fake_api.request_count("justin") == 4


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after__is_honoured_but_capped(fake_api: FakeTrakt, status: int) -> None:
    """A 429 or 503 asking for an hour waits only retry_after_max_s, then succeeds."""
    fake_api.add_account("justin")
    fake_api.inject("justin", Fault.http(status, times=1, headers={"Retry-After": "3600"}))
    config = config_for(fake_api, ["justin"], retry_after_max_s=0.4)

    started = time.monotonic()
    fetched = TraktClient(config.api).fetch(config.accounts[0], 1)

    assert fetched.attempts == 2
    assert 0.4 <= time.monotonic() - started < 5
    times = fake_api.request_times("justin")
    assert times[1] - times[0] >= 0.39


def test_retry_after_on_503__waits_that_long_then_succeeds(fake_api: FakeTrakt) -> None:
    """A 503 with Retry-After: 1 is retried a second later (backoff alone would be ~10 ms)."""
    fake_api.add_account("justin")
    fake_api.inject("justin", Fault.http(503, times=1, headers={"Retry-After": "1"}))
    config = config_for(fake_api, ["justin"], retries=3)

    fetched = TraktClient(config.api).fetch(config.accounts[0], 1)

    assert fetched.attempts == 2
    assert fetched.http_status == 200
    times = fake_api.request_times("justin")
    assert len(times) == 2
    assert 0.95 <= times[1] - times[0] < 5


def test_spent_budget_header__pauses_every_request(fake_api: FakeTrakt) -> None:
    """A success saying X-RateLimit-Remaining: 0 holds the next requests until the reset."""
    fake_api.add_account("justin")
    fake_api.add_account("sean")
    spent = {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1"}
    fake_api.inject("justin", Fault(headers=spent, times=1))
    config = config_for(fake_api, ["justin", "sean"])
    client = TraktClient(config.api, gate=RequestGate(10_000))

    client.fetch(config.accounts[0], 1)
    client.fetch(config.accounts[1], 1)

    first, second = fake_api.request_times("justin")[0], fake_api.request_times("sean")[0]
    assert second - first >= 0.95


def test_connection_error__masks_the_api_key_in_the_url(fake_api: FakeTrakt) -> None:
    """requests puts the URL (with the v1 api key) in its errors; ours never show it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = config_for(fake_api, ["justin"], api_key="SECRET-KEY-123", retries=0)
    config = config.model_copy(
        update={"api": config.api.model_copy(update={"base_url": f"http://127.0.0.1:{port}"})}
    )
    client = TraktClient(config.api, redactor=Redactor(config.global_secrets()))
    with pytest.raises(FetchError) as failure:
        client.fetch(config.accounts[0], 1)

    assert failure.value.kind == "connection"
    assert "SECRET-KEY-123" not in str(failure.value)
    assert "/account/settings/***" in str(failure.value)


# ---- content type ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type", ["text/plain", "text/plain; charset=utf-8", "application/octet-stream"]
)
def test_content_type__a_json_body_labelled_otherwise_fails_as_invalid_response(
    fake_api: FakeTrakt, content_type: str
) -> None:
    """A 200 whose Content-Type is not JSON fails at once (no retry), naming the type."""
    fake_api.add_account("justin")
    fake_api.inject("justin", Fault.mislabeled(content_type))
    config = config_for(fake_api, ["justin"], retries=3)

    with pytest.raises(FetchError) as failure:
        TraktClient(config.api).fetch(config.accounts[0], 1)

    assert failure.value.kind == "invalid_response"
    assert failure.value.message == f"content type: expected application/json, got {content_type}"
    assert failure.value.http_status == 200
    assert failure.value.attempts == 1
    assert fake_api.request_count("justin") == 1


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON;charset=UTF-8",
        "application/vnd.trakt+json",
        "",  # no header at all: tolerated, the body is parsed and checked as usual
    ],
)
def test_content_type__json_types_and_an_absent_header_are_accepted(
    fake_api: FakeTrakt, content_type: str
) -> None:
    """application/json, any */*+json, with or without parameters, or no header: parsed."""
    fake_api.add_account("justin")
    fake_api.inject("justin", Fault.mislabeled(content_type))
    config = config_for(fake_api, ["justin"])

    fetched = TraktClient(config.api).fetch(config.accounts[0], 1)

    assert fetched.payload is not None
    assert fetched.payload["profile"]["username"] == "justin"


@pytest.mark.parametrize(
    "fault", [Fault.html(), Fault.mislabeled("text/html")], ids=["html_page", "html_label"]
)
def test_content_type__html_is_named_an_html_page(fake_api: FakeTrakt, fault: Fault) -> None:
    """Cloudflare's page, or anything labelled text/html, is reported as an HTML page."""
    fake_api.add_account("justin")
    fake_api.inject("justin", fault)
    config = config_for(fake_api, ["justin"])

    with pytest.raises(FetchError) as failure:
        TraktClient(config.api).fetch(config.accounts[0], 1)

    assert failure.value.kind == "invalid_response"
    assert failure.value.message.startswith("expected JSON, got an HTML page (text/html")


def test_content_type__is_checked_even_when_the_body_is_unchanged(fake_api: FakeTrakt) -> None:
    """The body stored last time, now labelled text/plain, is refused, not skipped as unchanged."""
    fake_api.add_account("justin")
    config = config_for(fake_api, ["justin"])
    client = TraktClient(config.api)
    known = client.fetch(config.accounts[0], 1).sha256
    fake_api.inject("justin", Fault.mislabeled("text/plain"))

    with pytest.raises(FetchError) as failure:
        client.fetch(config.accounts[0], 1, known_sha256=known)

    assert failure.value.kind == "invalid_response"
    assert "content type" in failure.value.message


# ---- a deadline on the whole answer ------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["content_length", "chunked"])
def test_drip__fails_with_timeout_in_about_the_timeout_while_others_succeed(
    fake_api: FakeTrakt, chunked: bool
) -> None:
    """A body dripped 4 bytes every 0.2 s never trips a per-read timeout, yet each attempt ends
    about timeout_s after it began; timeouts are retried `retries` times, and the accounts
    fetched alongside are not held up."""
    timeout, retries = 0.6, 2
    users = fake_api.add_generated(6)
    dripping, others = users[0], users[1:]
    fake_api.inject(dripping, Fault.drip(4, 0.2, chunked=chunked))
    config = config_for(fake_api, users, timeout_s=timeout, retries=retries)
    client = TraktClient(config.api)

    def fetch(account: AccountConfig) -> tuple[str, object]:
        try:
            return account.username, client.fetch(account, 1)
        except FetchError as exc:
            return account.username, exc

    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        outcome = dict(pool.map(fetch, config.accounts))
    elapsed = time.monotonic() - started
    client.close()

    failure = outcome.pop(dripping)
    assert isinstance(failure, FetchError)
    assert failure.kind == "timeout"
    assert failure.message.startswith(f"the body took longer than {timeout:g}s")
    assert failure.attempts == retries + 1
    assert fake_api.request_count(dripping) == retries + 1
    times = fake_api.request_times(dripping)
    # Each attempt lasted about the timeout: not cut short, and not held by the drip.
    for earlier, later in itertools.pairwise(times):
        assert timeout * 0.9 <= later - earlier < 3 * timeout
    assert elapsed < 3 * timeout * (retries + 1)
    assert all(not isinstance(result, FetchError) for result in outcome.values())
    assert all(fake_api.request_count(name) == 1 for name in others)


def test_drip__a_slow_body_within_the_timeout_still_succeeds(fake_api: FakeTrakt) -> None:
    """A body in a few pieces 0.1 s apart, all in well before timeout_s, is read whole."""
    fake_api.add_account("justin")
    config = config_for(fake_api, ["justin"], timeout_s=2, retries=0)
    client = TraktClient(config.api)
    expected = client.fetch(config.accounts[0], 1)
    fake_api.inject("justin", Fault.drip(400, 0.1))

    fetched = client.fetch(config.accounts[0], 1)
    client.close()

    assert fetched.body == expected.body
    assert fetched.attempts == 1


def test_stalled_body__times_out_and_the_retry_is_answered_in_full(
    fake_api: FakeTrakt,
) -> None:
    """A body that stops after its first bytes times out; the retry is answered in full."""
    fake_api.add_account("justin")
    fake_api.inject("justin", Fault.drip(8, 30.0, times=1))
    config = config_for(fake_api, ["justin"], timeout_s=0.5, retries=1)
    client = TraktClient(config.api)

    started = time.monotonic()
    fetched = client.fetch(config.accounts[0], 1)
    elapsed = time.monotonic() - started
    client.close()

    assert fetched.attempts == 2
    assert fetched.payload is not None
    assert 0.45 <= elapsed < 1.5
