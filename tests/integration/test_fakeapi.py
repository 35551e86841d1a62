"""The bundled fake trakt API (etl.fakeapi), exercised over real HTTP with requests."""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from etl.fakeapi import (
    DEFAULT_API_KEY,
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
