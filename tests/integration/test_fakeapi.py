"""The bundled fake trakt API (etl.fakeapi), exercised over real HTTP with requests."""

from __future__ import annotations

import errno
import json
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from etl.fakeapi import (
    DEFAULT_API_KEY,
    HUGE_CHUNK,
    HUGE_MIN_BYTES,
    FakeTrakt,
    Fault,
    password_for,
    sample_settings,
    sha1_hex,
)

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
SEED_PAGE = Path("/work/shared/seed/account-settings-v1.txt")
SECTIONS = ("profile", "account", "viewing", "connections", "sharing_text")
SHARE_FLAGS = (
    "share_scrobbles_start",
    "share_scrobbles_end",
    "share_tv",
    "share_movies",
    "share_ratings",
    "share_checkins",
)


@pytest.fixture
def fake() -> Iterator[FakeTrakt]:
    with FakeTrakt() as server:
        yield server


def post(
    fake: FakeTrakt,
    username: str,
    password: str | None = None,
    api_key: str = DEFAULT_API_KEY,
    timeout: float = 5.0,
) -> requests.Response:
    secret = password_for(username) if password is None else password
    return requests.post(
        f"{fake.base_url}/account/settings/{api_key}",
        json={"username": username, "password": sha1_hex(secret)},
        timeout=timeout,
    )


def seed_example() -> dict[str, Any]:
    """The seed page's example success response, its ``  //comments`` stripped (not URLs)."""
    text = SEED_PAGE.read_text(encoding="utf-8")
    start = text.index("Example Response (success)")
    end = text.index("Example Response (failure)")
    block = text[text.index("{", start) : end]
    block = re.sub(r"[ \t]+//[^\n]*", "", block)
    return dict(json.loads(block[: block.rindex("}") + 1]))


def test_generated_account_gets_seed_shaped_success_payload(fake: FakeTrakt) -> None:
    """A generated account gets a 200 JSON success payload with every seed section and field."""
    (name,) = fake.add_generated(1)
    response = post(fake, name)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert body["status"] == "success"
    assert body["message"] == f"All settings for {name}"
    seed = seed_example()
    for section in ("profile", "account"):
        assert set(body[section]) == set(seed[section])
    assert body["profile"]["username"] == name
    assert isinstance(body["profile"]["joined"], int)
    assert isinstance(body["profile"]["last_login"], int)
    assert body["viewing"]["ratings"]["mode"] in {"simple", "advanced"}
    assert set(body["viewing"]["shouts"]) == {"show_badges", "show_spoilers"}
    assert set(body["connections"]["facebook"]) == {"connected", "timeline_enabled", *SHARE_FLAGS}
    assert set(body["connections"]["twitter"]) == {"connected", *SHARE_FLAGS}
    assert set(body["sharing_text"]) == {"watching", "watched"}
    assert {key: body[key] for key in SECTIONS} == fake.settings(name)


def test_justin_serves_exactly_the_seed_example(fake: FakeTrakt) -> None:
    """The account "justin" serves the seed page's example response, section for section."""
    fake.add_account("justin")
    body = post(fake, "justin").json()
    assert body == seed_example()
    assert sample_settings("justin") == {key: body[key] for key in SECTIONS}


def test_sample_settings_are_deterministic_and_varied() -> None:
    """Sample payloads repeat for the same index and vary across indexes as documented."""
    assert sample_settings("u", 3) == sample_settings("u", 3)
    samples = [sample_settings(f"user{i:05d}", i) for i in range(12)]
    assert {s["profile"]["gender"] for s in samples} == {"male", "female"}
    assert {s["viewing"]["ratings"]["mode"] for s in samples} == {"simple", "advanced"}
    assert all({"facebook", "twitter"} <= set(s["connections"]) for s in samples)
    with_tumblr = [s for s in samples if "tumblr" in s["connections"]]
    assert 0 < len(with_tumblr) < len(samples)
    assert len({json.dumps(s["connections"], sort_keys=True) for s in samples}) > 6


def test_wrong_api_key_is_401_invalid_api_key(fake: FakeTrakt) -> None:
    """A wrong api key in the path is 401 with the "invalid api key" failure."""
    fake.add_account("sean")
    response = post(fake, "sean", api_key="not-the-key")
    assert response.status_code == 401
    assert response.json() == {"status": "failure", "error": "invalid api key"}


def test_wrong_password_and_unknown_user_are_401_failed_authentication(fake: FakeTrakt) -> None:
    """A wrong password SHA-1 or an unknown username is 401 "failed authentication"."""
    fake.add_account("sean", password="right")
    expected = {"status": "failure", "error": "failed authentication"}
    wrong = post(fake, "sean", password="wrong")
    assert (wrong.status_code, wrong.json()) == (401, expected)
    unknown = post(fake, "nobody")
    assert (unknown.status_code, unknown.json()) == (401, expected)
    assert post(fake, "sean", password="right").status_code == 200


def test_bad_request_bodies_are_400_failures(fake: FakeTrakt) -> None:
    """A body that is not JSON or lacks username/password is 400 with a failure body."""
    url = f"{fake.base_url}/account/settings/{DEFAULT_API_KEY}"
    for data in (b"not json", b"", b'{"username": "sean"}', b"[1, 2]"):
        response = requests.post(url, data=data, timeout=5)
        assert response.status_code == 400
        assert response.json()["status"] == "failure"


def test_other_paths_and_methods_are_404_json(fake: FakeTrakt) -> None:
    """Unknown paths and methods other than POST get a 404 JSON failure."""
    fake.add_account("sean")
    get = requests.get(f"{fake.base_url}/account/settings/{DEFAULT_API_KEY}", timeout=5)
    other = requests.post(f"{fake.base_url}/users/settings", json={}, timeout=5)
    for response in (get, other):
        assert response.status_code == 404
        assert response.json()["status"] == "failure"


def test_keep_alive_session_serves_several_requests(fake: FakeTrakt) -> None:
    """One requests.Session can make many calls, empty answers included, on kept-alive sockets."""
    fake.add_account("sean")
    fake.inject("sean", Fault.empty(times=1))
    url = f"{fake.base_url}/account/settings/{DEFAULT_API_KEY}"
    credentials = {"username": "sean", "password": sha1_hex(password_for("sean"))}
    with requests.Session() as session:
        answers = [session.post(url, json=credentials, timeout=5) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert answers[0].content == b""
    assert answers[0].headers.get("Connection", "").lower() != "close"
    assert [a.json()["status"] for a in answers[1:]] == ["success", "success"]


@pytest.mark.parametrize(
    ("fault", "status", "content_type", "check"),
    [
        (
            Fault.http(503, headers={"Retry-After": "7"}),
            503,
            "application/json",
            lambda r: (
                r.json() == {"status": "failure", "error": "HTTP 503"}
                and r.headers["Retry-After"] == "7"
            ),
        ),
        (
            Fault.invalid_json(),
            200,
            "application/json",
            lambda r: r.content == b'{"status": "success", "profile": {',
        ),
        (
            Fault.html(502),
            502,
            "text/html",
            lambda r: r.text.lstrip().startswith("<!DOCTYPE html>") and "Cloudflare" in r.text,
        ),
        (
            Fault.html(),
            200,
            "text/html",
            lambda r: "<html" in r.text,
        ),
        (
            Fault.api_failure("rate limit exceeded"),
            200,
            "application/json",
            lambda r: r.json() == {"status": "failure", "error": "rate limit exceeded"},
        ),
        (
            Fault.api_failure(),
            200,
            "application/json",
            lambda r: r.json() == {"status": "failure", "error": "failed authentication"},
        ),
        (
            Fault.delay(0.01),
            200,
            "application/json",
            lambda r: r.json()["status"] == "success",
        ),
        (Fault.empty(), 200, "application/json", lambda r: r.content == b""),
        (
            Fault(status=500),
            500,
            "application/json",
            lambda r: r.json()["message"] == "All settings for sean",
        ),
    ],
    ids=[
        "http",
        "invalid_json",
        "html_error",
        "html_challenge",
        "api_failure",
        "api_failure_default",
        "delay",
        "empty",
        "normal_payload_with_status",
    ],
)
def test_each_fault_produces_its_answer(
    fake: FakeTrakt, fault: Fault, status: int, content_type: str, check: Any
) -> None:
    """Each Fault constructor makes the server answer as documented, for that account only."""
    fake.add_account("sean")
    fake.add_account("lara")
    fake.inject("sean", fault)
    response = post(fake, "sean")
    assert response.status_code == status
    assert response.headers["Content-Type"].startswith(content_type)
    assert check(response)
    assert post(fake, "lara").json()["status"] == "success"


def test_faults_apply_before_the_credential_check(fake: FakeTrakt) -> None:
    """A fault answers even when the password is wrong (the body's username selects it)."""
    fake.add_account("sean")
    fake.inject("sean", Fault.http(429))
    assert post(fake, "sean", password="wrong").status_code == 429


def test_times_n_fault_applies_n_times_then_normal_service_resumes(fake: FakeTrakt) -> None:
    """A fault with times=2 answers the next two requests, then the normal payload returns."""
    fake.add_account("sean")
    fake.inject("sean", Fault.http(500, times=2))
    statuses = [post(fake, "sean").status_code for _ in range(4)]
    assert statuses == [500, 500, 200, 200]


def test_queued_faults_apply_in_order(fake: FakeTrakt) -> None:
    """Faults injected one after another answer in the order they were queued."""
    fake.add_account("sean")
    fake.inject("sean", Fault.http(429, times=1))
    fake.inject("sean", Fault.empty(times=2))
    fake.inject("sean", Fault.http(502, times=1))
    answers = [post(fake, "sean") for _ in range(5)]
    assert [a.status_code for a in answers] == [429, 200, 200, 502, 200]
    assert [a.content == b"" for a in answers[1:3]] == [True, True]
    assert answers[4].json()["status"] == "success"


def test_permanent_fault_lasts_until_cleared(fake: FakeTrakt) -> None:
    """A fault without times answers every request until clear_faults."""
    fake.add_account("sean")
    fake.inject("sean", Fault.http(503))
    assert [post(fake, "sean").status_code for _ in range(3)] == [503, 503, 503]
    fake.clear_faults("sean")
    assert post(fake, "sean").status_code == 200


def test_delay_fault_delays_at_least_delay_s(fake: FakeTrakt) -> None:
    """A delay fault holds the answer back at least delay_s, and a short client timeout fires."""
    fake.add_account("sean")
    fake.inject("sean", Fault.delay(0.3, times=1))
    started = time.monotonic()
    response = post(fake, "sean")
    assert time.monotonic() - started >= 0.3
    assert response.json()["status"] == "success"
    fake.inject("sean", Fault.delay(1.0, times=1))
    with pytest.raises(requests.Timeout):
        post(fake, "sean", timeout=0.2)


def test_latency_applies_to_every_request() -> None:
    """latency_s is added to every request."""
    with FakeTrakt(latency_s=0.15) as fake:
        fake.add_account("sean")
        started = time.monotonic()
        post(fake, "sean")
        post(fake, "nobody")
        assert time.monotonic() - started >= 0.3


def test_request_count_counts_per_user(fake: FakeTrakt) -> None:
    """request_count counts POSTs per username, and in total including bad requests."""
    fake.add_account("sean")
    fake.add_account("lara")
    for _ in range(3):
        post(fake, "sean")
    post(fake, "lara", password="wrong")
    requests.post(f"{fake.base_url}/account/settings/x", data=b"junk", timeout=5)
    assert fake.request_count("sean") == 3
    assert fake.request_count("lara") == 1
    assert fake.request_count("nobody") == 0
    assert fake.request_count() == 5
    fake.reset_counts()
    assert fake.request_count() == 0
    assert fake.request_count("sean") == 0


def test_set_profile_account_and_viewing_change_what_is_served(fake: FakeTrakt) -> None:
    """set_profile, set_account_field and set_viewing change the next payload."""
    fake.add_account("sean")
    fake.set_profile("sean", location="Paris", age=41)
    fake.set_account_field("sean", timezone="UP1", use_24hr=True)
    fake.set_viewing("sean", ratings_mode="simple", show_spoilers=True)
    body = post(fake, "sean").json()
    assert (body["profile"]["location"], body["profile"]["age"]) == ("Paris", 41)
    assert (body["account"]["timezone"], body["account"]["use_24hr"]) == ("UP1", True)
    assert body["viewing"]["ratings"]["mode"] == "simple"
    assert body["viewing"]["shouts"]["show_spoilers"] is True


def test_set_connection_adds_a_network_and_changes_flags(fake: FakeTrakt) -> None:
    """set_connection creates an absent network (flags False) and updates an existing one."""
    fake.add_account("sean")
    fake.set_connection("sean", "path", connected=True, share_tv=True)
    fake.set_connection("sean", "twitter", share_ratings=True)
    connections = post(fake, "sean").json()["connections"]
    assert connections["path"] == {
        "connected": True,
        **dict.fromkeys(SHARE_FLAGS, False),
        "share_tv": True,
    }
    assert connections["twitter"]["share_ratings"] is True


def test_remove_network_drops_it_from_the_payload(fake: FakeTrakt) -> None:
    """remove_network removes that network from the served connections."""
    fake.add_account("sean")
    fake.remove_network("sean", "twitter")
    connections = post(fake, "sean").json()["connections"]
    assert "twitter" not in connections
    assert "facebook" in connections


def test_sharing_text_mutators_change_what_is_served(fake: FakeTrakt) -> None:
    """set_sharing_text changes or adds a text; remove_sharing_text drops it."""
    fake.add_account("sean")
    fake.set_sharing_text("sean", "watching", "Now: [item]")
    fake.set_sharing_text("sean", "checkin", "Checked in to [item]")
    fake.remove_sharing_text("sean", "watched")
    texts = post(fake, "sean").json()["sharing_text"]
    assert texts == {"watching": "Now: [item]", "checkin": "Checked in to [item]"}


def test_set_payload_serves_arbitrary_sections(fake: FakeTrakt) -> None:
    """set_payload replaces the sections wholesale, unknown fields and wrong types included."""
    fake.add_account("sean")
    payload = {"profile": {"username": "sean", "age": "thirty", "new_field": [1]}}
    fake.set_payload("sean", payload)
    body = post(fake, "sean").json()
    assert body == {"status": "success", "message": "All settings for sean", **payload}
    assert fake.settings("sean") == payload


def test_stop_is_prompt_while_a_delayed_request_is_in_flight() -> None:
    """stop() returns promptly even while a request sleeps in a long delay fault."""
    fake = FakeTrakt()
    fake.start()
    fake.add_account("sean")
    fake.inject("sean", Fault.delay(30))
    outcome: list[BaseException | requests.Response] = []

    def call() -> None:
        try:
            outcome.append(post(fake, "sean", timeout=10))
        except requests.RequestException as exc:
            outcome.append(exc)

    client = threading.Thread(target=call)
    client.start()
    deadline = time.monotonic() + 5
    while fake.request_count("sean") == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    fake.stop()
    assert time.monotonic() - started < 1.0
    client.join(timeout=5)
    assert not client.is_alive()
    assert len(outcome) == 1
    assert isinstance(outcome[0], requests.ConnectionError)
    with pytest.raises(RuntimeError):
        _ = fake.base_url


def settings_url(fake: FakeTrakt) -> str:
    return f"{fake.base_url}/account/settings/{DEFAULT_API_KEY}"


def credentials(username: str) -> dict[str, str]:
    return {"username": username, "password": sha1_hex(password_for(username))}


def is_tcp_reset(exc: BaseException) -> bool:
    """Whether an ECONNRESET OSError is in exc's args / cause chain (requests nests urllib3's).

    A clean EOF is no match: http.client's RemoteDisconnected is a ConnectionResetError too,
    but without an errno.
    """
    pending: list[object] = [exc]
    while pending:
        item = pending.pop()
        if isinstance(item, OSError) and item.errno == errno.ECONNRESET:
            return True
        if isinstance(item, BaseException):
            pending.extend(item.args)
            pending.extend(x for x in (item.__cause__, item.__context__) if x is not None)
    return False


def wait_until_idle(fake: FakeTrakt, timeout: float = 5.0) -> bool:
    """Whether the fake finishes every answer in progress (waits, streams) within `timeout`."""
    deadline = time.monotonic() + timeout
    while fake.active_answers():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_reset_fault_gives_connection_error_with_a_reset(fake: FakeTrakt) -> None:
    """Fault.reset reads the request and drops the connection: requests.ConnectionError (RST)."""
    fake.add_account("sean")
    fake.inject("sean", Fault.reset(times=1))
    with pytest.raises(requests.ConnectionError) as raised:
        post(fake, "sean")
    assert is_tcp_reset(raised.value)
    assert fake.request_count("sean") == 1
    assert post(fake, "sean").json()["status"] == "success"


def test_reset_fault_on_a_kept_alive_session_then_service_resumes(fake: FakeTrakt) -> None:
    """A reset on a pooled keep-alive connection fails that call only; the session goes on."""
    fake.add_account("sean")
    with requests.Session() as session:
        first = session.post(settings_url(fake), json=credentials("sean"), timeout=5)
        fake.inject("sean", Fault.reset(times=1))
        with pytest.raises(requests.ConnectionError):
            session.post(settings_url(fake), json=credentials("sean"), timeout=5)
        last = session.post(settings_url(fake), json=credentials("sean"), timeout=5)
    assert (first.status_code, last.status_code) == (200, 200)


def test_alternating_fault_serves_fault_normal_fault_normal(fake: FakeTrakt) -> None:
    """Fault.alternating(503) fails requests 1, 3, 5, ... and serves the others normally."""
    fake.add_account("sean")
    fake.inject("sean", Fault.alternating(503))
    answers = [post(fake, "sean") for _ in range(6)]
    assert [a.status_code for a in answers] == [503, 200, 503, 200, 503, 200]
    assert answers[0].json() == {"status": "failure", "error": "HTTP 503"}
    assert answers[1].json()["message"] == "All settings for sean"
    assert answers[2].headers["Content-Type"] == "application/json"


def test_every_k_counts_from_the_first_request_after_inject(fake: FakeTrakt) -> None:
    """every=3 applies to requests 1, 4, 7 after inject, whatever came before it."""
    fake.add_account("sean")
    post(fake, "sean")
    fake.inject("sean", Fault.alternating(500, every=3))
    statuses = [post(fake, "sean").status_code for _ in range(7)]
    assert statuses == [500, 200, 200, 500, 200, 200, 500]


def test_every_k_times_counts_only_the_requests_the_fault_applied_to(fake: FakeTrakt) -> None:
    """With every=2 and times=2 the fault answers requests 1 and 3, then it is used up."""
    fake.add_account("sean")
    fake.inject("sean", Fault(status=429, body=b"{}", every=2, times=2))
    fake.inject("sean", Fault.http(502, times=1))
    statuses = [post(fake, "sean").status_code for _ in range(6)]
    assert statuses == [429, 200, 429, 502, 200, 200]


def test_normal_and_error_answers_are_labelled_application_json(fake: FakeTrakt) -> None:
    """The success payload (first and cached) and the fake's own failures say application/json."""
    fake.add_account("sean")
    answers = [post(fake, "sean"), post(fake, "sean"), post(fake, "sean", password="wrong")]
    assert [a.status_code for a in answers] == [200, 200, 401]
    assert [a.headers["Content-Type"] for a in answers] == ["application/json"] * 3


@pytest.mark.parametrize("content_type", ["text/plain", "text/plain; charset=utf-8"])
def test_mislabeled_fault_serves_the_payload_under_another_content_type(
    fake: FakeTrakt, content_type: str
) -> None:
    """Fault.mislabeled keeps the normal JSON body and changes only the Content-Type."""
    fake.add_account("sean")
    fake.inject("sean", Fault.mislabeled(content_type, times=1))
    response = post(fake, "sean")
    assert response.headers["Content-Type"] == content_type
    assert response.json() == post(fake, "sean").json()
    assert response.json()["status"] == "success"


def test_mislabeled_fault_with_an_empty_type_sends_no_content_type(fake: FakeTrakt) -> None:
    """Fault.mislabeled("") leaves the Content-Type header out altogether."""
    fake.add_account("sean")
    fake.inject("sean", Fault.mislabeled("", times=1))
    response = post(fake, "sean")
    assert "Content-Type" not in response.headers
    assert response.json()["status"] == "success"


@pytest.mark.parametrize("chunked", [False, True], ids=["content_length", "chunked"])
def test_drip_fault_sends_the_normal_answer_slowly_within_each_read_timeout(
    fake: FakeTrakt, chunked: bool
) -> None:
    """Fault.drip sends the whole normal answer in pieces an interval apart: each read is
    quick, so a per-read timeout (0.3 s here) never fires while the answer takes longer."""
    fake.add_account("sean")
    normal = post(fake, "sean").content
    piece = len(normal) // 5 + 1  # 5 pieces, 4 intervals of 0.1 s
    fake.inject("sean", Fault.drip(piece, 0.1, chunked=chunked, times=1))
    started = time.monotonic()
    response = post(fake, "sean", timeout=0.3)
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert response.content == normal
    assert response.headers["Content-Type"] == "application/json"
    if chunked:
        assert response.headers["Transfer-Encoding"] == "chunked"
    else:
        assert response.headers["Content-Length"] == str(len(normal))
    assert 0.4 <= elapsed < 3
    assert post(fake, "sean").content == normal  # times=1: normal service again


def test_drip_fault_sends_the_head_at_once_then_a_few_bytes_per_interval(fake: FakeTrakt) -> None:
    """The head arrives before the first interval; then the body comes a piece per interval."""
    fake.add_account("sean")
    fake.inject("sean", Fault.drip(4, 0.2, times=1))
    with requests.post(
        settings_url(fake), json=credentials("sean"), timeout=5, stream=True
    ) as response:
        started = time.monotonic()
        assert response.status_code == 200
        pieces = [response.raw.read1(1024) for _ in range(3)]
        elapsed = time.monotonic() - started
    assert b"".join(pieces) == b'{"status": "succ'[: len(b"".join(pieces))]
    assert all(len(p) <= 4 for p in pieces)
    assert 0.3 <= elapsed < 2  # pieces 2 and 3 each waited an interval


def test_stop_is_prompt_while_a_body_drips() -> None:
    """stop() returns promptly while a dripped body has minutes left to go."""
    fake = FakeTrakt()
    fake.start()
    fake.add_account("sean")
    fake.inject("sean", Fault.drip(1, 5.0))
    with requests.post(
        settings_url(fake), json=credentials("sean"), timeout=5, stream=True
    ) as response:
        assert response.raw.read1(1) == b"{"
        started = time.monotonic()
        fake.stop()
        assert time.monotonic() - started < 1.0


def test_new_fault_arguments_are_validated() -> None:
    """every < 1, a too small huge body, a non-3xx redirect and mixed answers are refused."""
    with pytest.raises(ValueError, match="every"):
        Fault.alternating(503, every=0)
    with pytest.raises(ValueError, match="stream_bytes"):
        Fault.huge(HUGE_MIN_BYTES - 1)
    with pytest.raises(ValueError, match="redirect"):
        Fault.redirect("/elsewhere", status=200)
    with pytest.raises(ValueError, match="mutually exclusive"):
        Fault(body=b"", reset_connection=True)
    assert Fault.huge(HUGE_MIN_BYTES).stream_bytes == HUGE_MIN_BYTES
    with pytest.raises(ValueError, match="drip_bytes"):
        Fault.drip(0)
    with pytest.raises(ValueError, match="drip_interval_s"):
        Fault.drip(4, interval_s=-1)
    with pytest.raises(ValueError, match="drip_bytes cannot"):
        Fault(drip_bytes=4, reset_connection=True)
    with pytest.raises(ValueError, match="drip_bytes cannot"):
        Fault(drip_bytes=4, stream_bytes=HUGE_MIN_BYTES)


def test_huge_chunked_body_is_streamed_with_exactly_size_bytes(fake: FakeTrakt) -> None:
    """Fault.huge streams a chunked JSON body (no Content-Length) of exactly size_bytes."""
    fake.add_account("sean")
    size = 3 * HUGE_CHUNK + 12_345
    fake.inject("sean", Fault.huge(size, times=1))
    with requests.post(
        settings_url(fake), json=credentials("sean"), timeout=5, stream=True
    ) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "application/json"
        assert response.headers["Transfer-Encoding"] == "chunked"
        assert "Content-Length" not in response.headers
        body = b"".join(response.iter_content(HUGE_CHUNK))
    assert len(body) == size
    parsed = json.loads(body)
    assert parsed["status"] == "success"
    assert set(parsed["padding"]) == {"x"}
    assert post(fake, "sean").json()["status"] == "success"


def test_huge_chunked_body_goes_out_in_64_kib_chunks(fake: FakeTrakt) -> None:
    """On the wire the chunked body is several chunks of at most 64 KiB, then the last-chunk."""
    fake.add_account("sean")
    size = 2 * HUGE_CHUNK + 100
    fake.inject("sean", Fault.huge(size, times=1))
    body = json.dumps(credentials("sean")).encode()
    request = (
        f"POST /account/settings/{DEFAULT_API_KEY} HTTP/1.1\r\nHost: x\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    port = int(fake.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        raw = b""
        while chunk := sock.recv(1 << 16):
            raw += chunk
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    sizes: list[int] = []
    while True:
        line, _, rest = rest.partition(b"\r\n")
        length = int(line, 16)
        sizes.append(length)
        if length == 0:
            break
        assert rest[length : length + 2] == b"\r\n"
        rest = rest[length + 2 :]
    assert rest == b"\r\n"
    assert sum(sizes) == size
    assert len(sizes) > 3
    assert max(sizes) <= HUGE_CHUNK


def test_huge_with_content_length_declares_the_size(fake: FakeTrakt) -> None:
    """Fault.huge(chunked=False) sends Content-Length: size_bytes and exactly that many bytes."""
    fake.add_account("sean")
    size = 5 * HUGE_CHUNK + 7
    fake.inject("sean", Fault.huge(size, chunked=False, times=1))
    response = post(fake, "sean")
    assert response.status_code == 200
    assert response.headers["Content-Length"] == str(size)
    assert "Transfer-Encoding" not in response.headers
    assert len(response.content) == size
    assert json.loads(response.content)["status"] == "success"


def test_huge_body_is_never_held_whole_in_memory(fake: FakeTrakt) -> None:
    """Serving and reading a 32 MiB huge body keeps the process's traced peak far below it."""
    fake.add_account("sean")
    size = 32 * 1024 * 1024
    fake.inject("sean", Fault.huge(size, times=1))
    received = 0
    tracemalloc.start()
    try:
        with requests.post(
            settings_url(fake), json=credentials("sean"), timeout=10, stream=True
        ) as response:
            for piece in response.iter_content(HUGE_CHUNK):
                received += len(piece)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert received == size
    assert peak < size // 8


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content_length"])
def test_client_closing_early_on_huge_body_leaves_server_serving(
    fake: FakeTrakt, capfd: pytest.CaptureFixture[str], chunked: bool
) -> None:
    """A client that closes after one piece of a huge body ends that connection quietly only."""
    fake.add_account("sean")
    fake.inject("sean", Fault.huge(256 * 1024 * 1024, chunked=chunked, times=2))
    for _ in range(2):
        with requests.post(
            settings_url(fake), json=credentials("sean"), timeout=5, stream=True
        ) as response:
            assert len(response.raw.read(HUGE_CHUNK)) == HUGE_CHUNK
    assert post(fake, "sean").json()["status"] == "success"
    assert wait_until_idle(fake), "a huge body is still being streamed to a closed connection"
    assert post(fake, "sean").status_code == 200
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err
    assert "Exception" not in captured.err


def test_stop_is_prompt_while_a_huge_body_waits_on_a_client_that_stopped_reading() -> None:
    """stop() returns promptly while a huge body is blocked on a client that reads nothing."""
    fake = FakeTrakt()
    fake.start()
    fake.add_account("sean")
    fake.inject("sean", Fault.huge(512 * 1024 * 1024))
    body = json.dumps(credentials("sean")).encode()
    request = (
        f"POST /account/settings/{DEFAULT_API_KEY} HTTP/1.1\r\nHost: x\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    port = int(fake.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(request)
        assert sock.recv(16).startswith(b"HTTP/1.1 200")
        time.sleep(0.2)  # the server fills the socket buffers and blocks writing
        started = time.monotonic()
        fake.stop()
        assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirect_fault_answers_its_status_and_location(fake: FakeTrakt, status: int) -> None:
    """Fault.redirect answers with its 3xx status, the Location header and an empty body."""
    fake.add_account("sean")
    fake.inject("sean", Fault.redirect("https://api.trakt.tv/elsewhere", status, times=1))
    response = requests.post(
        settings_url(fake), json=credentials("sean"), timeout=5, allow_redirects=False
    )
    assert response.status_code == status
    assert response.headers["Location"] == "https://api.trakt.tv/elsewhere"
    assert response.content == b""
    assert post(fake, "sean").status_code == 200


def test_redirect_fault_is_followed_by_requests_to_the_location(fake: FakeTrakt) -> None:
    """A followed 302 to a relative Location lands on the fake's 404 for that path."""
    fake.add_account("sean")
    fake.inject("sean", Fault.redirect("/moved", times=1))
    response = post(fake, "sean")
    assert [r.status_code for r in response.history] == [302]
    assert response.status_code == 404
    assert response.url == f"{fake.base_url}/moved"


def test_request_times_increase_and_are_per_user(fake: FakeTrakt) -> None:
    """request_times lists monotonic arrival times in order, per user and overall."""
    fake.add_account("sean")
    fake.add_account("lara")
    started = time.monotonic()
    for name in ("sean", "lara", "sean", "nobody"):
        post(fake, name)
    requests.post(settings_url(fake), data=b"junk", timeout=5)
    requests.post(f"{fake.base_url}/elsewhere", json={"username": "sean"}, timeout=5)
    finished = time.monotonic()
    every = fake.request_times()
    sean, lara = fake.request_times("sean"), fake.request_times("lara")
    assert len(every) == 5
    assert every == sorted(every)
    assert len(set(every)) == len(every)
    assert started <= every[0]
    assert every[-1] <= finished
    assert len(sean) == 2
    assert sean[0] < sean[1]
    assert sean == [every[0], every[2]]
    assert lara == [every[1]]
    assert fake.request_times("nobody") == [every[3]]
    assert fake.request_times("ghost") == []
    fake.reset_counts()
    assert fake.request_times() == []
    assert fake.request_times("sean") == []
    post(fake, "sean")
    assert len(fake.request_times("sean")) == 1


def test_request_times_record_the_arrival_before_latency() -> None:
    """With latency_s the recorded time is when the request arrived, not when it was answered."""
    with FakeTrakt(latency_s=0.3) as fake:
        fake.add_account("sean")
        started = time.monotonic()
        post(fake, "sean")
        (arrived,) = fake.request_times("sean")
        assert arrived - started < 0.2


def test_request_times_from_concurrent_clients_stay_in_order(fake: FakeTrakt) -> None:
    """Concurrent keep-alive clients' requests are all recorded, in non-decreasing order."""
    names = fake.add_generated(4)

    def client(name: str) -> None:
        with requests.Session() as session:
            for _ in range(25):
                session.post(settings_url(fake), json=credentials(name), timeout=5)

    threads = [threading.Thread(target=client, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    every = fake.request_times()
    assert len(every) == 100
    assert every == sorted(every)
    assert sorted(t for name in names for t in fake.request_times(name)) == every


def test_module_cli_prints_a_url_that_serves() -> None:
    """`python -m etl.fakeapi --port 0` prints a base URL first that serves generated accounts."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "etl.fakeapi", "--port", "0", "--accounts", "3"]
    command += ["--api-key", "KEY"]
    with subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True
    ) as process:
        try:
            assert process.stdout is not None
            ready, _, _ = select.select([process.stdout], [], [], 10)
            assert ready, "the fake API printed nothing within 10 s"
            base_url = process.stdout.readline().strip()
            assert re.fullmatch(r"http://127\.0\.0\.1:\d+", base_url)
            response = requests.post(
                f"{base_url}/account/settings/KEY",
                json={"username": "user00003", "password": sha1_hex("pw-user00003")},
                timeout=5,
            )
            assert response.json()["message"] == "All settings for user00003"
        finally:
            process.terminate()
        assert process.wait(timeout=10) == 0
