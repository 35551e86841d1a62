"""The bundled fake trakt.tv API: v1 ``POST /account/settings/{apikey}`` over real HTTP.

This module owns the stand-in for api.trakt.tv that the tests, the ``trakt-etl demo`` command and
the benchmarks talk to. It is a real HTTP/1.1 server (`etl.fakeserver`: one asyncio loop in a
daemon thread, bound to 127.0.0.1, keep-alive with Content-Length framing; only ``Fault.huge``
and ``Fault.drip`` may send a chunked body) that:

- serves the v1 account settings payload, exactly in the shape of the seed API page
  (``sample_settings`` makes deterministic, varied accounts; ``"justin"`` is the seed's example);
- checks the api key path segment and the username / SHA-1 password body as the real API does;
- lets a test change what an account serves (``set_profile``, ``set_connection``, ...) and
  misbehave on purpose for one account (``inject`` a ``Fault``: an HTTP error, invalid JSON, an
  HTML error page, an API ``"failure"``, a delay, an empty body, a connection reset, a huge
  streamed body, a redirect, a body dripped a few bytes at a time, the JSON payload under another
  Content-Type), ``times`` requests at a time, on every ``every``-th request;
- counts the requests it receives, per username, and records when each one arrived.

Faults are looked up by the username in the request body, before any credential check. Waits
(``latency_s``, fault delays) are timers that never hold the state lock, and ``stop()`` returns
promptly: waiting requests and idle keep-alive connections are dropped. An account's answer is
serialized once and reused until the account changes, so the fake stays cheap per request.

``python -m etl.fakeapi --port 8765 --accounts 100`` runs it in the foreground.
"""

from __future__ import annotations

import argparse
import array
import copy
import gc
import hashlib
import hmac
import json
import re
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from types import FrameType, TracebackType
from typing import Any, Self
from urllib.parse import unquote, urlsplit

from etl.fakeserver import (
    Answer,
    HttpServer,
    Reset,
    Response,
    Stream,
    response_bytes,
)

__all__ = [
    "DEFAULT_API_KEY",
    "HUGE_CHUNK",
    "HUGE_MIN_BYTES",
    "FakeTrakt",
    "Fault",
    "main",
    "password_for",
    "sample_settings",
    "sha1_hex",
]

DEFAULT_API_KEY = "fake-api-key"

_SETTINGS_PATH = re.compile(r"^/account/settings/([^/]+)/?$")
_UNSEEN = object()
_PARSED_BODIES_MAX = 250_000

HUGE_CHUNK = 64 * 1024
"""A ``Fault.huge`` body goes out in pieces of (at most) this many bytes."""
_HUGE_HEAD = b'{"status":"success","padding":"'
_HUGE_TAIL = b'"}'
HUGE_MIN_BYTES = len(_HUGE_HEAD) + len(_HUGE_TAIL)
"""The smallest ``Fault.huge`` body: ``{"status":"success","padding":""}``."""
_HUGE_PAD = b"x" * HUGE_CHUNK

_SEED_JUSTIN: dict[str, Any] = {
    "profile": {
        "username": "justin",
        "full_name": "Justin",
        "gender": "male",
        "age": 30,
        "location": "San Diego, CA",
        "about": (
            "Co-founder of trakt. Please use the feedback tab on the right side to leave us "
            "suggestions or bugs you come across. Hope you're enjoying the site!"
        ),
        "joined": 1285436965,
        "last_login": 1334901801,
        "avatar": "http://trakt.us/images/avatars/1.4.jpg",
        "url": "http://trakt.tv/user/justin",
        "vip": True,
    },
    "account": {"timezone": "UM8", "use_24hr": False, "protected": False},
    "viewing": {
        "ratings": {"mode": "advanced"},
        "shouts": {"show_badges": False, "show_spoilers": False},
    },
    "connections": {
        "facebook": {
            "connected": True,
            "timeline_enabled": True,
            "share_scrobbles_start": True,
            "share_scrobbles_end": True,
            "share_tv": True,
            "share_movies": True,
            "share_ratings": True,
            "share_checkins": True,
        },
        "twitter": {
            "connected": True,
            "share_scrobbles_start": False,
            "share_scrobbles_end": False,
            "share_tv": True,
            "share_movies": True,
            "share_ratings": False,
            "share_checkins": False,
        },
        "tumblr": {
            "connected": True,
            "share_scrobbles_start": False,
            "share_scrobbles_end": False,
            "share_tv": True,
            "share_movies": True,
            "share_ratings": False,
            "share_checkins": False,
        },
    },
    "sharing_text": {
        "watching": "I'm watching [item]",
        "watched": "I just watched [item]",
    },
}

_SHARE_FLAGS = (
    "share_scrobbles_start",
    "share_scrobbles_end",
    "share_tv",
    "share_movies",
    "share_ratings",
    "share_checkins",
)
_LOCATIONS = (
    "San Diego, CA",
    "Paris, France",
    "Berlin, Germany",
    "São Paulo, Brazil",
    "Tokyo, Japan",
    "",
    "Toronto, Canada",
)
_TIMEZONES = ("UM8", "UTC", "UP1", "UM5", "UP9", "UP10", "UM3")
_WATCHING = ("I'm watching [item]", "Now watching [item]", "Watching [item] on trakt")
_WATCHED = ("I just watched [item]", "Just finished [item]")


def password_for(username: str) -> str:
    """The password the fake gives a generated account."""
    return f"pw-{username}"


def sha1_hex(text: str) -> str:
    """The lowercase SHA-1 hex digest of ``text`` (UTF-8): what v1 sends as the password."""
    return hashlib.sha1(text.encode("utf-8"), usedforsecurity=False).hexdigest()


def _connection(network: str, connected: bool, bits: int) -> dict[str, Any]:
    flags: dict[str, Any] = {"connected": connected}
    if network == "facebook":
        flags["timeline_enabled"] = bool(bits & 0x40)
    for position, name in enumerate(_SHARE_FLAGS):
        flags[name] = bool(bits >> position & 1)
    return flags


def sample_settings(username: str, index: int = 0) -> dict[str, Any]:
    """A deterministic, varied v1 settings payload (the sections, without status/message).

    ``index`` varies gender, age, location, timezone, ratings mode, the shout flags, which
    networks are connected and their share flags, and the sharing texts. Every account has
    facebook and twitter; every third (index 0, 3, 6, ...) also has tumblr. For ``"justin"`` it
    is exactly the example of the seed API page.
    """
    if username == "justin":
        return copy.deepcopy(_SEED_JUSTIN)
    i = index
    connections: dict[str, Any] = {
        "facebook": _connection("facebook", True, (i * 37 + 5) & 0x7F),
        "twitter": _connection("twitter", i % 4 != 3, (i * 11 + 12) & 0x3F),
    }
    if i % 3 == 0:
        connections["tumblr"] = _connection("tumblr", i % 2 == 0, (i * 5 + 12) & 0x3F)
    return {
        "profile": {
            "username": username,
            "full_name": username.replace("_", " ").title(),
            "gender": "female" if i % 2 else "male",
            "age": 18 + (i * 7) % 53,
            "location": _LOCATIONS[i % len(_LOCATIONS)],
            "about": f"Sample trakt account #{i}. Mostly TV, some movies.",
            "joined": 1285436965 + i * 86_400,
            "last_login": 1334901801 + i * 3_600,
            "avatar": f"http://trakt.us/images/avatars/{i}.jpg",
            "url": f"http://trakt.tv/user/{username}",
            "vip": i % 4 == 0,
        },
        "account": {
            "timezone": _TIMEZONES[i % len(_TIMEZONES)],
            "use_24hr": i % 2 == 1,
            "protected": i % 5 == 4,
        },
        "viewing": {
            "ratings": {"mode": "advanced" if i % 3 != 1 else "simple"},
            "shouts": {"show_badges": i % 2 == 0, "show_spoilers": i % 3 == 2},
        },
        "connections": connections,
        "sharing_text": {
            "watching": _WATCHING[i % len(_WATCHING)],
            "watched": _WATCHED[i % len(_WATCHED)],
        },
    }


def _failure_body(error: str) -> bytes:
    return json.dumps({"status": "failure", "error": error}).encode("utf-8")


def _html_page(status: int) -> bytes:
    if status == 200:
        title = "Just a moment..."
        heading = "Checking if the site connection is secure"
        detail = "api.trakt.tv needs to review the security of your connection before proceeding."
    else:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        title = f"api.trakt.tv | {status}: {phrase}"
        heading = f"{phrase} <span>Error code {status}</span>"
        detail = "The web server reported an error. Please try again in a few minutes."
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en-US">\n<head>\n'
        f"<title>{title}</title>\n"
        '<meta charset="UTF-8" />\n'
        '<meta name="robots" content="noindex, nofollow" />\n'
        "</head>\n<body>\n"
        '<div id="cf-wrapper"><div id="cf-error-details">\n'
        f"<h1>{heading}</h1>\n<p>{detail}</p>\n"
        '<p class="ray-id">Cloudflare Ray ID: <strong>7f1c0ffee0000000</strong> &bull; '
        "Performance &amp; security by Cloudflare</p>\n"
        "</div></div>\n</body>\n</html>\n"
    ).encode()


@dataclass
class Fault:
    """What the server does instead of the normal answer, for one account.

    ``body=None`` serves the normal payload, with ``status`` (and ``content_type``) applied only
    when the normal answer is the success payload; ``headers`` are always added. ``times=None``
    applies to every request from now on; ``times=n`` to the next ``n`` requests only.

    ``every=k`` applies the fault only to every ``k``-th request for that username (the 1st,
    ``k+1``-th, ... counted from the first request it sees at the head of the queue, i.e. the
    first after ``inject`` when nothing else is queued); the others get normal service, and
    ``times`` counts only the requests the fault applied to.

    Instead of ``body``, ``reset_connection=True`` reads the request and drops the connection
    with a TCP reset, and ``stream_bytes=n`` streams an ``n``-byte JSON body in ``HUGE_CHUNK``
    pieces (``Transfer-Encoding: chunked`` when ``chunked``, else a ``Content-Length``) without
    ever building it whole. ``delay_s`` is slept first in every case.

    ``drip_bytes=n`` sends whatever the answer would be (``body``, or the normal one) slowly: the
    head at once, then the body ``n`` bytes at a time, ``drip_interval_s`` apart (chunked when
    ``chunked``, else with a Content-Length): every read is quick, the whole answer is not.
    """

    status: int = 200
    body: bytes | None = None
    content_type: str = "application/json"
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    times: int | None = None
    every: int = 1
    reset_connection: bool = False
    stream_bytes: int | None = None
    chunked: bool = True
    drip_bytes: int | None = None
    drip_interval_s: float = 1.0

    def __post_init__(self) -> None:
        if not 100 <= self.status <= 599:
            raise ValueError(f"status must be 100..599, got {self.status}")
        if self.delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {self.delay_s}")
        if self.times is not None and self.times < 1:
            raise ValueError(f"times must be None or >= 1, got {self.times}")
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")
        if self.stream_bytes is not None and self.stream_bytes < HUGE_MIN_BYTES:
            raise ValueError(
                f"stream_bytes must be None or >= {HUGE_MIN_BYTES}, got {self.stream_bytes}"
            )
        answers = (self.body is not None, self.reset_connection, self.stream_bytes is not None)
        if sum(answers) > 1:
            raise ValueError("body, reset_connection and stream_bytes are mutually exclusive")
        if self.drip_bytes is not None:
            self._check_drip(self.drip_bytes)

    def _check_drip(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"drip_bytes must be None or >= 1, got {size}")
        if self.drip_interval_s < 0:
            raise ValueError(f"drip_interval_s must be >= 0, got {self.drip_interval_s}")
        if self.reset_connection or self.stream_bytes is not None:
            raise ValueError("drip_bytes cannot drip a reset_connection or stream_bytes answer")

    @classmethod
    def http(
        cls, status: int, times: int | None = None, headers: dict[str, str] | None = None
    ) -> Self:
        """An HTTP error; the body is ``{"status": "failure", "error": "HTTP <status>"}``."""
        return cls(
            status=status,
            body=_failure_body(f"HTTP {status}"),
            headers=dict(headers or {}),
            times=times,
        )

    @classmethod
    def invalid_json(cls, times: int | None = None) -> Self:
        """A 200 ``application/json`` answer that is truncated, invalid JSON."""
        return cls(status=200, body=b'{"status": "success", "profile": {', times=times)

    @classmethod
    def html(cls, status: int = 200, times: int | None = None) -> Self:
        """A Cloudflare-like ``text/html`` page (a challenge page for 200, else an error page)."""
        return cls(
            status=status,
            body=_html_page(status),
            content_type="text/html; charset=UTF-8",
            times=times,
        )

    @classmethod
    def api_failure(cls, message: str = "failed authentication", times: int | None = None) -> Self:
        """A 200 answer ``{"status":"failure","error":message}``."""
        return cls(status=200, body=_failure_body(message), times=times)

    @classmethod
    def delay(cls, seconds: float, times: int | None = None) -> Self:
        """The normal answer, after sleeping ``seconds``."""
        return cls(delay_s=seconds, times=times)

    @classmethod
    def empty(cls, times: int | None = None) -> Self:
        """A 200 ``application/json`` answer with an empty body."""
        return cls(status=200, body=b"", times=times)

    @classmethod
    def reset(cls, times: int | None = None) -> Self:
        """Read the request, then drop the connection with a TCP reset (no answer at all)."""
        return cls(reset_connection=True, times=times)

    @classmethod
    def alternating(cls, status: int, every: int = 2, times: int | None = None) -> Self:
        """``Fault.http(status)`` on requests 1, 1+every, 1+2*every, ...; normal service between."""
        return cls(status=status, body=_failure_body(f"HTTP {status}"), every=every, times=times)

    @classmethod
    def huge(cls, size_bytes: int, chunked: bool = True, times: int | None = None) -> Self:
        """A 200 ``application/json`` body of exactly ``size_bytes``, streamed in 64 KiB pieces.

        The body is ``{"status":"success","padding":"xxx..."}``; ``chunked=True`` sends it with
        ``Transfer-Encoding: chunked``, ``chunked=False`` with a ``Content-Length``.
        """
        return cls(status=200, stream_bytes=size_bytes, chunked=chunked, times=times)

    @classmethod
    def drip(
        cls,
        bytes_per_interval: int = 4,
        interval_s: float = 1.0,
        chunked: bool = False,
        times: int | None = None,
    ) -> Self:
        """The normal answer, its body sent ``bytes_per_interval`` bytes every ``interval_s``.

        Each piece comes well within any read timeout, so only a deadline on the whole answer
        stops a client from waiting for all of it (a 1 KB body at 4 bytes/s takes minutes).
        """
        return cls(
            drip_bytes=bytes_per_interval,
            drip_interval_s=interval_s,
            chunked=chunked,
            times=times,
        )

    @classmethod
    def mislabeled(cls, content_type: str = "text/plain", times: int | None = None) -> Self:
        """The normal success payload (valid JSON) under another ``Content-Type`` header;
        ``""`` sends no Content-Type header at all."""
        return cls(content_type=content_type, times=times)

    @classmethod
    def redirect(cls, location: str, status: int = 302, times: int | None = None) -> Self:
        """A ``status`` (3xx) answer with a ``Location: location`` header and an empty body."""
        if not 300 <= status <= 399:
            raise ValueError(f"a redirect status must be 300..399, got {status}")
        return cls(
            status=status, body=b"", content_type="", headers={"Location": location}, times=times
        )


@dataclass
class _Account:
    password_sha1: str
    sections: dict[str, Any]
    # The success answer as served (body, and whole keep-alive response); None once changed.
    body: bytes | None = None
    raw: bytes | None = None


@dataclass
class _QueuedFault:
    fault: Fault
    remaining: int | None
    seen: int = 0


def _failure(status: int, error: str) -> Response:
    return Response(status, _failure_body(error))


def _dripped(response: Response, size: int, interval_s: float, chunked: bool) -> Stream:
    """`response` with its body cut into `size`-byte pieces sent `interval_s` apart."""
    body = response.body
    pieces = [body[at : at + size] for at in range(0, len(body), size)]
    return Stream(
        response.status,
        len(body),
        chunked,
        response.content_type,
        response.headers,
        pieces,
        interval_s,
    )


def _huge_pieces(size: int) -> Iterator[bytes]:
    """``{"status":"success","padding":"x..."}`` of ``size`` bytes, in non-empty pieces."""
    padding = size - HUGE_MIN_BYTES
    first = min(padding, HUGE_CHUNK - len(_HUGE_HEAD))
    yield _HUGE_HEAD + _HUGE_PAD[:first]
    left = padding - first
    while left > 0:
        piece = _HUGE_PAD if left >= HUGE_CHUNK else _HUGE_PAD[:left]
        yield piece
        left -= len(piece)
    yield _HUGE_TAIL


class FakeTrakt:
    """An in-process fake of the trakt v1 account settings API; see the module docstring."""

    def __init__(self, api_key: str = DEFAULT_API_KEY, latency_s: float = 0.0) -> None:
        self.api_key = api_key
        self.latency_s = latency_s
        self._lock = threading.Lock()
        self._accounts: dict[str, _Account] = {}
        self._faults: dict[str, deque[_QueuedFault]] = {}
        self._counts: dict[str, int] = {}
        self._total = 0
        # Arrival times (time.monotonic()) of settings POSTs: appended, never sorted or scanned.
        self._times: array.array[float] = array.array("d")
        self._user_times: dict[str, array.array[float]] = {}
        self._server: HttpServer | None = None
        self._parsed_bodies: dict[bytes, object] = {}

    # ---- accounts -------------------------------------------------------------------------

    def add_account(
        self,
        username: str,
        password: str | None = None,
        settings: dict[str, Any] | None = None,
    ) -> None:
        """Add an account; raises ValueError if the username exists already."""
        secret = password_for(username) if password is None else password
        with self._lock:
            if username in self._accounts:
                raise ValueError(f"account {username!r} exists already")
            sections = (
                sample_settings(username, index=len(self._accounts))
                if settings is None
                else copy.deepcopy(settings)
            )
            self._accounts[username] = _Account(sha1_hex(secret), sections)

    def add_generated(self, count: int, prefix: str = "user") -> list[str]:
        """Add ``count`` sample accounts ``<prefix>00001``, ... (skipping names taken)."""
        names: list[str] = []
        number = 0
        with self._lock:
            taken = set(self._accounts)
        while len(names) < count:
            number += 1
            name = f"{prefix}{number:05d}"
            if name not in taken:
                names.append(name)
        for name in names:
            self.add_account(name)
        return names

    @property
    def usernames(self) -> list[str]:
        """The accounts' usernames, in the order they were added."""
        with self._lock:
            return list(self._accounts)

    def settings(self, username: str) -> dict[str, Any]:
        """A deep copy of the sections served now for ``username``."""
        with self._lock:
            return copy.deepcopy(self._account(username).sections)

    def set_profile(self, username: str, **fields: Any) -> None:
        """Update fields of the ``profile`` section (``set_profile("u", location="Paris")``)."""
        with self._lock:
            self._section(username, "profile").update(fields)

    def set_account_field(self, username: str, **fields: Any) -> None:
        """Update fields of the ``account`` section (timezone, use_24hr, protected)."""
        with self._lock:
            self._section(username, "account").update(fields)

    def set_viewing(
        self,
        username: str,
        ratings_mode: str | None = None,
        show_badges: bool | None = None,
        show_spoilers: bool | None = None,
    ) -> None:
        """Update the ``viewing`` section; a None argument leaves that field as it is."""
        with self._lock:
            viewing = self._section(username, "viewing")
            if ratings_mode is not None:
                _subsection(viewing, "ratings")["mode"] = ratings_mode
            if show_badges is not None:
                _subsection(viewing, "shouts")["show_badges"] = show_badges
            if show_spoilers is not None:
                _subsection(viewing, "shouts")["show_spoilers"] = show_spoilers

    def set_connection(self, username: str, network: str, **flags: Any) -> None:
        """Update a network's flags; an absent network is created with every flag False first."""
        with self._lock:
            connections = self._section(username, "connections")
            if network not in connections:
                connections[network] = _connection(network, False, 0)
            _subsection(connections, network).update(flags)

    def remove_network(self, username: str, network: str) -> None:
        """Remove a network from ``connections``; KeyError if it is not there."""
        with self._lock:
            connections = self._section(username, "connections")
            if network not in connections:
                raise KeyError(f"{username!r} has no {network!r} connection")
            del connections[network]

    def set_sharing_text(self, username: str, action: str, text: str) -> None:
        """Set the sharing text of ``action`` (``watching``, ``watched``, ...)."""
        with self._lock:
            self._section(username, "sharing_text")[action] = text

    def remove_sharing_text(self, username: str, action: str) -> None:
        """Remove the sharing text of ``action``; KeyError if it is not there."""
        with self._lock:
            texts = self._section(username, "sharing_text")
            if action not in texts:
                raise KeyError(f"{username!r} has no {action!r} sharing text")
            del texts[action]

    def set_payload(self, username: str, payload: dict[str, Any]) -> None:
        """Replace the served sections wholesale (a deep copy is kept).

        Served as ``{"status": "success", "message": ..., **payload}``, so a payload may also
        override ``status`` or ``message``, carry unknown fields or the wrong types.
        """
        with self._lock:
            account = self._account(username)
            account.sections = copy.deepcopy(payload)
            account.body = account.raw = None

    # ---- faults ---------------------------------------------------------------------------

    def inject(self, username: str, fault: Fault) -> None:
        """Queue a fault for requests naming ``username`` (it need not be an account).

        The head of the queue answers; a fault with ``times=n`` is dropped after ``n`` requests,
        then the next queued one (or normal service) follows. A ``times=None`` fault stays at
        the head until ``clear_faults``.
        """
        with self._lock:
            self._faults.setdefault(username, deque()).append(_QueuedFault(fault, fault.times))

    def clear_faults(self, username: str | None = None) -> None:
        """Drop the queued faults of ``username`` (None: of every account)."""
        with self._lock:
            if username is None:
                self._faults.clear()
            else:
                self._faults.pop(username, None)

    # ---- observation ----------------------------------------------------------------------

    def request_count(self, username: str | None = None) -> int:
        """POSTs seen naming ``username`` in their body (None: every POST, bad ones included)."""
        with self._lock:
            return self._total if username is None else self._counts.get(username, 0)

    def request_times(self, username: str | None = None) -> list[float]:
        """``time.monotonic()`` at the arrival of each settings POST, in arrival order.

        ``username`` selects the POSTs naming it in their body; None gives every POST to the
        settings path (bad bodies included). Cleared by ``reset_counts``.
        """
        with self._lock:
            times = self._times if username is None else self._user_times.get(username)
            return [] if times is None else times.tolist()

    def reset_counts(self) -> None:
        """Set every request count back to zero and forget the request times."""
        with self._lock:
            self._total = 0
            self._counts.clear()
            self._times = array.array("d")
            self._user_times.clear()

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self, port: int = 0, *, reuse_port: bool = False) -> str:
        """Listen on 127.0.0.1:``port`` (a free port when 0), serve in a daemon thread.

        Returns the base URL ``http://127.0.0.1:PORT``; raises RuntimeError if already started.
        With ``reuse_port``, other processes may listen on the same port and share the load.
        """
        with self._lock:
            if self._server is not None:
                raise RuntimeError("the fake trakt API is already started")
            self._server = HttpServer(self, port, reuse_port=reuse_port)
        return self.base_url

    def stop(self) -> None:
        """Stop serving, promptly: in-flight waiting requests are dropped. Idempotent."""
        with self._lock:
            server, self._server = self._server, None
        if server is not None:
            server.stop()

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``; RuntimeError before ``start``."""
        server = self._server
        if server is None:
            raise RuntimeError("the fake trakt API is not started")
        return f"http://127.0.0.1:{server.port}"

    def active_answers(self) -> int:
        """Connections with an answer in progress (waiting or streaming); 0 when idle."""
        server = self._server
        return 0 if server is None else server.active_streams()

    def __enter__(self) -> Self:
        if self._server is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---- internals ------------------------------------------------------------------------

    def _account(self, username: str) -> _Account:
        account = self._accounts.get(username)
        if account is None:
            raise KeyError(f"no fake trakt account {username!r}")
        return account

    def _section(self, username: str, name: str) -> dict[str, Any]:
        """A section to change in place: the account's serialized answer is dropped."""
        account = self._account(username)
        account.body = account.raw = None
        return _subsection(account.sections, name)

    def _take_fault(self, username: str) -> Fault | None:
        queue = self._faults.get(username)
        if not queue:
            return None
        head = queue[0]
        every = head.fault.every
        if every > 1:
            head.seen += 1
            if (head.seen - 1) % every:
                return None  # an off request of an every-k fault: normal service
        if head.remaining is not None:
            head.remaining -= 1
            if head.remaining <= 0:
                queue.popleft()
                if not queue:
                    del self._faults[username]
        return head.fault

    def arrive(self, method: str, target: str, body: bytes) -> _Pending:
        """Count, time and match one request to its fault on arrival; answer it later.

        The answer is made when the wait (``latency_s`` plus a delay fault's) is over, so it
        shows the settings as they are then.
        """
        path = urlsplit(target).path if "?" in target or "#" in target else target
        match = _SETTINGS_PATH.match(path)
        parsed = self._parsed(body)
        username = parsed.get("username") if isinstance(parsed, dict) else None
        if not isinstance(username, str):
            username = None
        fault: Fault | None = None
        with self._lock:
            if method == "POST":
                self._total += 1
                if match is not None:
                    arrived = time.monotonic()  # under the lock: the list stays in order
                    self._times.append(arrived)
                    if username is not None:
                        self._counts[username] = self._counts.get(username, 0) + 1
                        user_times = self._user_times.get(username)
                        if user_times is None:
                            user_times = self._user_times[username] = array.array("d")
                        user_times.append(arrived)
                        fault = self._take_fault(username)
        served = method == "POST" and match is not None
        delay = self.latency_s + (fault.delay_s if fault is not None and served else 0.0)
        api_key = unquote(match.group(1)) if match is not None else ""
        return _Pending(self, delay, method, path, api_key if served else None, parsed, fault)

    def _reply(
        self, method: str, path: str, api_key: str | None, parsed: object, fault: Fault | None
    ) -> Answer:
        if api_key is None:
            return _failure(404, f"not found: {method} {path}")
        if fault is None:
            return self._answer(api_key, parsed)
        if fault.reset_connection:
            return Reset()
        if fault.stream_bytes is not None:
            return Stream(
                fault.status,
                fault.stream_bytes,
                fault.chunked,
                fault.content_type,
                dict(fault.headers),
                _huge_pieces(fault.stream_bytes),
            )
        if fault.body is not None:
            response = Response(fault.status, fault.body, fault.content_type, dict(fault.headers))
        else:
            response = self._answer(api_key, parsed)
            response.raw = None  # the fault changes what goes out
            if response.status == 200:
                response.status = fault.status
                response.content_type = fault.content_type
            response.headers.update(fault.headers)
        if fault.drip_bytes is not None:
            return _dripped(response, fault.drip_bytes, fault.drip_interval_s, fault.chunked)
        return response

    def _answer(self, api_key: str, parsed: object) -> Response:
        if not hmac.compare_digest(api_key.encode("utf-8"), self.api_key.encode("utf-8")):
            return _failure(401, "invalid api key")
        if not isinstance(parsed, dict):
            return _failure(400, "the request body must be a JSON object")
        username, password = parsed.get("username"), parsed.get("password")
        if not isinstance(username, str) or not isinstance(password, str):
            return _failure(400, "missing username or password")
        with self._lock:
            account = self._accounts.get(username)
            if account is None or not hmac.compare_digest(
                account.password_sha1.encode("utf-8"), password.lower().encode("utf-8")
            ):
                return _failure(401, "failed authentication")
            if account.body is None or account.raw is None:
                payload = {
                    "status": "success",
                    "message": f"All settings for {username}",
                    **account.sections,
                }
                account.body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
                account.raw = response_bytes(Response(200, account.body), close=False)
            return Response(200, account.body, raw=account.raw)

    def _parsed(self, body: bytes) -> object:
        """The request body as JSON (None if it is not), remembered: the same bodies come
        back every run, and decoding them was a good part of the fake's time per request."""
        parsed = self._parsed_bodies.get(body, _UNSEEN)
        if parsed is _UNSEEN:
            parsed = _parse_json(body)
            if len(self._parsed_bodies) >= _PARSED_BODIES_MAX:
                self._parsed_bodies.clear()
            if isinstance(parsed, dict):  # never shared: handlers read it, nobody writes it
                self._parsed_bodies[body] = parsed
        return parsed


@dataclass(slots=True)
class _Pending:
    """A request counted on arrival, to be answered once `delay_s` has passed."""

    fake: FakeTrakt
    delay_s: float
    method: str
    path: str
    api_key: str | None  # None: not the settings endpoint (a 404)
    parsed: object
    fault: Fault | None

    def answer(self) -> Answer:
        return self.fake._reply(self.method, self.path, self.api_key, self.parsed, self.fault)


def _subsection(parent: dict[str, Any], name: str) -> dict[str, Any]:
    section = parent.setdefault(name, {})
    if not isinstance(section, dict):
        raise TypeError(f"{name!r} is a {type(section).__name__}, not an object")
    return section


def _parse_json(body: bytes) -> object:
    """The parsed body, or None when it is not JSON."""
    try:
        parsed: object = json.loads(body)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None
    return parsed


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _print_banner(url: str, api_key: str, names: list[str]) -> None:
    """The base URL first (scripts read that line), then how to try it."""
    print(url)
    print(f"api key:   {api_key}")
    if names:
        print(f"accounts:  {len(names)} ({names[0]} .. {names[-1]})")
        print("password:  pw-<username>, sent as its SHA-1 hex")
        print(
            f"try:       curl -X POST {url}/account/settings/{api_key} "
            f'-d \'{{"username": "{names[0]}", '
            f'"password": "{sha1_hex(password_for(names[0]))}"}}\''
        )
    else:
        print("accounts:  none")
    print("Ctrl-C to stop")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """Run the fake API in the foreground until Ctrl-C (or SIGTERM)."""
    parser = argparse.ArgumentParser(
        prog="python -m etl.fakeapi",
        description="Serve the fake trakt v1 account settings API on 127.0.0.1.",
    )
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--accounts", type=int, default=100, help="sample accounts to generate")
    parser.add_argument("--prefix", default="user", help="username prefix (user00001, ...)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added to every request")
    parser.add_argument("--api-key", default=DEFAULT_API_KEY)
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error("--port must be 0..65535")
    if args.accounts < 0 or args.latency_ms < 0:
        parser.error("--accounts and --latency-ms must not be negative")

    fake = FakeTrakt(api_key=args.api_key, latency_s=args.latency_ms / 1000)
    names = fake.add_generated(args.accounts, prefix=args.prefix)
    # The accounts live as long as the process: keep the garbage collector from walking them
    # over and over (with 100,000 accounts that was most of the fake's time per request).
    gc.freeze()
    try:
        url = fake.start(args.port)
    except OSError as exc:
        print(f"cannot listen on 127.0.0.1:{args.port}: {exc}", file=sys.stderr)
        return 1
    # TERM is handled before the URL goes out: whoever reads it may stop us at once, and an
    # unhandled TERM would end the process without stopping the server (exit status -15).
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        _print_banner(url, args.api_key, names)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM (to the group) mid-stop
        fake.stop()
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
