"""The bundled fake trakt.tv API: v1 ``POST /account/settings/{apikey}`` over real HTTP.

This module owns the stand-in for api.trakt.tv that the tests, the ``trakt-etl demo`` command and
the benchmarks talk to. It is a real HTTP/1.1 server (stdlib ``ThreadingHTTPServer`` in a daemon
thread, bound to 127.0.0.1, keep-alive with Content-Length framing; only ``Fault.huge`` may
send a chunked body) that:

- serves the v1 account settings payload, exactly in the shape of the seed API page
  (``sample_settings`` makes deterministic, varied accounts; ``"justin"`` is the seed's example);
- checks the api key path segment and the username / SHA-1 password body as the real API does;
- lets a test change what an account serves (``set_profile``, ``set_connection``, ...) and
  misbehave on purpose for one account (``inject`` a ``Fault``: an HTTP error, invalid JSON, an
  HTML error page, an API ``"failure"``, a delay, an empty body, a connection reset, a huge
  streamed body, a redirect), ``times`` requests at a time, on every ``every``-th request;
- counts the requests it receives, per username, and records when each one arrived.

Faults are looked up by the username in the request body, before any credential check. Sleeps
(``latency_s``, fault delays) never hold the state lock, and ``stop()`` returns promptly: sleeping
requests wake up and have their connection dropped, idle keep-alive connections are shut down.

``python -m etl.fakeapi --port 8765 --accounts 100`` runs it in the foreground.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import copy
import hashlib
import hmac
import json
import re
import signal
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any, Self
from urllib.parse import unquote, urlsplit

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
MAX_REQUEST_BODY = 1 << 20
"""Request bodies larger than this are refused with 413 (the real bodies are ~80 bytes)."""

_SETTINGS_PATH = re.compile(r"^/account/settings/([^/]+)/?$")
_SERVE_POLL_S = 0.05

HUGE_CHUNK = 64 * 1024
"""A ``Fault.huge`` body goes out in pieces of (at most) this many bytes."""
_HUGE_HEAD = b'{"status":"success","padding":"'
_HUGE_TAIL = b'"}'
HUGE_MIN_BYTES = len(_HUGE_HEAD) + len(_HUGE_TAIL)
"""The smallest ``Fault.huge`` body: ``{"status":"success","padding":""}``."""
_HUGE_PAD = b"x" * HUGE_CHUNK
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, not FIN

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


@dataclass
class _QueuedFault:
    fault: Fault
    remaining: int | None
    seen: int = 0


@dataclass
class _Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _Reset:
    """Drop the connection with a TCP reset instead of answering."""


@dataclass
class _Stream:
    """A body of ``size`` bytes written piece by piece (see ``_huge_pieces``)."""

    status: int
    size: int
    chunked: bool
    content_type: str
    headers: dict[str, str]


def _failure(status: int, error: str) -> _Response:
    return _Response(status, _failure_body(error))


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
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

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
            self._account(username).sections = copy.deepcopy(payload)

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

    def start(self, port: int = 0) -> str:
        """Listen on 127.0.0.1:``port`` (a free port when 0), serve in a daemon thread.

        Returns the base URL ``http://127.0.0.1:PORT``; raises RuntimeError if already started.
        """
        with self._lock:
            if self._server is not None:
                raise RuntimeError("the fake trakt API is already started")
            server = _Server(("127.0.0.1", port), self)
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": _SERVE_POLL_S},
                name=f"fake-trakt-{server.server_port}",
                daemon=True,
            )
            thread.start()
            self._server, self._thread = server, thread
        return self.base_url

    def stop(self) -> None:
        """Stop serving, promptly: in-flight sleeping requests are dropped. Idempotent."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None:
            return
        server.stopping.set()
        server.shutdown()
        server.server_close()
        server.close_connections()
        if thread is not None:
            thread.join(timeout=5)

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``; RuntimeError before ``start``."""
        server = self._server
        if server is None:
            raise RuntimeError("the fake trakt API is not started")
        return f"http://127.0.0.1:{server.server_port}"

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
        return _subsection(self._account(username).sections, name)

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

    def _respond(
        self, method: str, target: str, body: bytes, stopping: threading.Event
    ) -> _Response | _Stream | _Reset | None:
        """The answer to one request; None drops the connection (the server is stopping).

        The request is counted, timed and matched to its fault on arrival, before
        ``latency_s``; the sleeps never hold the lock.
        """
        path = urlsplit(target).path
        match = _SETTINGS_PATH.match(path)
        parsed = _parse_json(body)
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
        latency = self.latency_s
        if latency > 0 and stopping.wait(latency):
            return None
        if method != "POST" or match is None:
            return _failure(404, f"not found: {method} {path}")
        if fault is None:
            return self._answer(unquote(match.group(1)), parsed)
        if fault.delay_s > 0 and stopping.wait(fault.delay_s):
            return None
        if fault.reset_connection:
            return _Reset()
        if fault.stream_bytes is not None:
            return _Stream(
                fault.status,
                fault.stream_bytes,
                fault.chunked,
                fault.content_type,
                dict(fault.headers),
            )
        if fault.body is not None:
            return _Response(fault.status, fault.body, fault.content_type, dict(fault.headers))
        response = self._answer(unquote(match.group(1)), parsed)
        if response.status == 200:
            response.status = fault.status
            response.content_type = fault.content_type
        response.headers.update(fault.headers)
        return response

    def _answer(self, api_key: str, parsed: object) -> _Response:
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
            payload = {
                "status": "success",
                "message": f"All settings for {username}",
                **account.sections,
            }
            body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        return _Response(200, body)


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


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], fake: FakeTrakt) -> None:
        self.fake = fake
        self.stopping = threading.Event()
        self._connections_lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if isinstance(request, socket.socket):
            with self._connections_lock:
                self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        if isinstance(request, socket.socket):
            with self._connections_lock:
                self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Shut down every open connection, waking handlers blocked on keep-alive reads."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return  # the client went away (it timed out, say): not the server's problem
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle on, the body waits for the client's
    # delayed ACK (~40 ms a request on Linux), which would make the fake the bottleneck.
    disable_nagle_algorithm = True
    server_version = "FakeTrakt/1.0"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the per-request lines on stderr."""

    def _serve(self) -> None:
        server = self.server
        assert isinstance(server, _Server)
        body = self._read_body()
        if body is None:
            return
        response = server.fake._respond(self.command, self.path, body, server.stopping)
        if response is None:
            self.close_connection = True
        elif isinstance(response, _Reset):
            self._reset()
        elif isinstance(response, _Stream):
            self._stream(response, server.stopping)
        else:
            self._send(response)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _serve

    def _read_body(self) -> bytes | None:
        """The request body; None after answering an unacceptable one (and closing)."""
        encoding = self.headers.get("Transfer-Encoding")
        if encoding is not None and encoding.strip().lower() != "identity":
            self._refuse(411, "send the body with a Content-Length")
            return None
        declared = self.headers.get("Content-Length")
        if declared is None:
            return b""
        try:
            length = int(declared)
            if length < 0:
                raise ValueError(declared)
        except ValueError:
            self._refuse(400, "invalid Content-Length")
            return None
        if length > MAX_REQUEST_BODY:
            self._refuse(413, "request body too large")
            return None
        return self.rfile.read(length)

    def _refuse(self, status: int, error: str) -> None:
        self.close_connection = True
        self._send(_failure(status, error))

    def _send(self, response: _Response) -> None:
        self.send_response(response.status)
        if response.content_type:
            self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    def _reset(self) -> None:
        """Close the connection at once with a TCP reset (SO_LINGER 0), answering nothing."""
        self.close_connection = True
        connection = self.connection
        with contextlib.suppress(OSError):
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        # rfile holds a reference on the socket: close it too, so close() really closes now
        # (and the server's later shutdown(SHUT_WR) cannot send a FIN first).
        self.rfile.close()
        connection.close()

    def _stream(self, stream: _Stream, stopping: threading.Event) -> None:
        """Write a huge body piece by piece; a client that goes away just ends the connection."""
        self.send_response(stream.status)
        if stream.content_type:
            self.send_header("Content-Type", stream.content_type)
        if stream.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(stream.size))
        for name, value in stream.headers.items():
            self.send_header(name, value)
        try:
            self.end_headers()
            if self.command == "HEAD":
                return
            for piece in _huge_pieces(stream.size):
                if stopping.is_set():
                    self.close_connection = True
                    return
                if stream.chunked:
                    self.wfile.write(b"%x\r\n%b\r\n" % (len(piece), piece))
                else:
                    self.wfile.write(piece)
            if stream.chunked:
                self.wfile.write(b"0\r\n\r\n")
        except OSError:  # the client closed early (reset, broken pipe) or stop() shut it down
            self.close_connection = True


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


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
    try:
        url = fake.start(args.port)
    except OSError as exc:
        print(f"cannot listen on 127.0.0.1:{args.port}: {exc}", file=sys.stderr)
        return 1
    print(url)
    print(f"api key:   {args.api_key}")
    if names:
        print(f"accounts:  {len(names)} ({names[0]} .. {names[-1]})")
        print("password:  pw-<username>, sent as its SHA-1 hex")
        print(
            f"try:       curl -X POST {url}/account/settings/{args.api_key} "
            f'-d \'{{"username": "{names[0]}", '
            f'"password": "{sha1_hex(password_for(names[0]))}"}}\''
        )
    else:
        print("accounts:  none")
    print("Ctrl-C to stop")
    sys.stdout.flush()

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
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
