"""The HTTP client against the fake API: retries, pacing, and what counts as final."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from etl.client import TraktClient
from etl.config import Config
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
    # A burst of 20, then 20 a window: the 200th request cannot leave before 9 windows.
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


def test_retry_after__is_honoured_but_capped(fake_api: FakeTrakt) -> None:
    """A 429 asking for an hour waits only retry_after_max_s, then succeeds."""
    fake_api.add_account("justin")
    fake_api.inject("justin", Fault.http(429, times=1, headers={"Retry-After": "3600"}))
    config = config_for(fake_api, ["justin"], retry_after_max_s=0.4)

    started = time.monotonic()
    fetched = TraktClient(config.api).fetch(config.accounts[0], 1)

    assert fetched.attempts == 2
    assert 0.4 <= time.monotonic() - started < 5
    times = fake_api.request_times("justin")
    assert times[1] - times[0] >= 0.39


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
