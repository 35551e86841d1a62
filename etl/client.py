"""The trakt HTTP client: one adapter per API version behind one `TraktClient`.

An adapter knows its version's request and answer shapes (`V1Adapter`: POST
``account/settings/{apikey}``); the client knows HTTP: sessions, timeouts (a deadline on the whole
answer, not only on each read), the content type, the body size limit, and translating every
failure into a `FetchError` with a kind. Error texts are redacted here, where the account's
secrets are at hand; the v1 api key is a URL path segment, and `requests` puts URLs into its
exception messages.
"""

from __future__ import annotations

import hashlib
import http.cookiejar
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

import requests
import structlog
import urllib3
from requests.adapters import HTTPAdapter
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt
from tenacity.wait import wait_exponential_jitter

from etl.config import AccountConfig, ApiConfig
from etl.errors import ErrorKind, FetchError, InvalidPayloadError, Stopped
from etl.normalize import check_v1_envelope, from_v1
from etl.ratelimit import RequestGate, server_pause
from etl.records import Snapshot
from etl.redact import Redactor

log = structlog.get_logger("etl.client")

USER_AGENT = "trakt-etl/0.1 (+https://github.com/trakt-etl)"
_NO_COOKIES = http.cookiejar.DefaultCookiePolicy(allowed_domains=[])
_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    url: str
    json: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    content_type: str
    body: bytes
    pause: float | None  # what the server's headers asked us to wait, capped


@dataclass(frozen=True, slots=True)
class Fetched:
    """A success answer for one account, decoded but not yet normalized.

    An answer whose body is byte for byte the one stored last time (`known_sha256`) is not
    decoded at all: it was checked when it first came, and it cannot change anything.
    """

    username: str
    api_version: int
    body: str | None  # the text received, stored in raw_payloads; None when unchanged
    payload: Mapping[str, Any] | None  # None when unchanged
    http_status: int
    attempts: int
    sha256: str = ""  # of the body's bytes

    @property
    def unchanged(self) -> bool:
        return self.payload is None


class ApiAdapter(Protocol):
    """What one API version contributes: its request, its envelope check and its normalizer."""

    version: int

    def request(self, api: ApiConfig, account: AccountConfig) -> Request: ...

    def check(self, payload: object, username: str) -> Mapping[str, Any]: ...

    def normalize(self, payload: Mapping[str, Any]) -> Snapshot: ...


class V1Adapter:
    """API v1: ``POST {base}/account/settings/{apikey}`` with the username and SHA-1 password."""

    version = 1

    def request(self, api: ApiConfig, account: AccountConfig) -> Request:
        return Request(
            method="POST",
            url=f"{api.base_url}/account/settings/{api.api_key}",
            json={"username": account.username, "password": account.password_sha1_hex()},
        )

    def check(self, payload: object, username: str) -> Mapping[str, Any]:
        if isinstance(payload, Mapping) and payload.get("status") == "failure":
            raise FetchError(
                ErrorKind.API_FAILURE, f"the API answered failure: {_api_error(payload)}"
            )
        return check_v1_envelope(payload, username)

    def normalize(self, payload: Mapping[str, Any]) -> Snapshot:
        return from_v1(payload)


ADAPTERS: dict[int, ApiAdapter] = {1: V1Adapter()}


def adapter_for(version: int) -> ApiAdapter:
    try:
        return ADAPTERS[version]
    except KeyError:
        raise FetchError(
            ErrorKind.API_FAILURE, f"API version {version} is not supported yet"
        ) from None


def _api_error(payload: Mapping[str, Any]) -> str:
    error = payload.get("error") or payload.get("message") or "no reason given"
    return str(error)[:200]


def _kind_for_status(status: int) -> ErrorKind:
    if status in (401, 403):
        return ErrorKind.AUTH
    if status == 429:
        return ErrorKind.RATE_LIMITED
    return ErrorKind.HTTP


# Worth another attempt: the server or the network may do better in a moment.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504, 520, 521, 522, 523, 524})
_RETRY_KINDS = frozenset({ErrorKind.TIMEOUT, ErrorKind.CONNECTION})


def is_retryable(error: FetchError) -> bool:
    """Timeouts, resets, 429 and 5xx are retried; 4xx and bad payloads are final."""
    return error.kind in _RETRY_KINDS or error.http_status in RETRY_STATUSES


class TraktClient:
    """Fetches one account's settings, with retries, pacing and a size limit.

    Thread-safe: each worker thread gets its own pooled keep-alive session; every attempt,
    retries included, waits for its turn at the shared `RequestGate`.
    """

    def __init__(
        self,
        api: ApiConfig,
        *,
        gate: RequestGate | None = None,
        redactor: Redactor | None = None,
        session_factory: Callable[[], requests.Session] = requests.Session,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._api = api
        self._gate = gate or RequestGate(api.max_requests_per_s)
        self._redactor = redactor or Redactor()
        self._session_factory = session_factory
        self._sleep = sleep
        self._backoff = wait_exponential_jitter(
            multiplier=api.backoff_initial_s, max=api.backoff_max_s, jitter=api.backoff_initial_s
        )
        self._local = threading.local()
        # Prepared request templates by (method, URL, headers); shared by the threads.
        self._templates: dict[tuple[str, str], requests.PreparedRequest] = {}
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()

    def close(self) -> None:
        with self._sessions_lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = self._session_factory()
            session.headers.setdefault("User-Agent", USER_AGENT)
            # Proxies and CA bundles from the environment, read once: with trust_env on,
            # requests re-reads them (and ~/.netrc) on every request.
            found = session.merge_environment_settings(self._api.base_url, {}, None, None, None)
            session.proxies.update(found["proxies"])
            # A CA bundle path costs a stat per request; plain HTTP (the fake API) needs none.
            https = self._api.base_url.startswith("https:")
            session.verify = found["verify"] if https else True
            session.trust_env = False
            # The API is stateless: cookies (Cloudflare's, say) are neither kept nor sent.
            session.cookies.set_policy(_NO_COOKIES)
            adapter = HTTPAdapter(pool_connections=1, pool_maxsize=1, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._local.session = session
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    def _prepare(self, session: requests.Session, request: Request) -> requests.PreparedRequest:
        """The request ready to send: a copy of a template prepared once per method and URL
        (session headers merged, URL parsed), with this request's headers and JSON body.

        Preparing every request through `Session.request` cost more CPU than the rest of an
        unchanged account's sync: requests merges its settings with runtime Protocol checks.
        """
        key = (request.method, request.url)
        template = self._templates.get(key)
        if template is None:
            template = session.prepare_request(requests.Request(request.method, request.url))
            self._templates[key] = template
        prepared = template.copy()
        if request.headers:
            prepared.headers.update(request.headers)
        if request.json is not None:
            body = json.dumps(request.json, separators=(",", ":")).encode("utf-8")
            prepared.body = body
            prepared.headers["Content-Type"] = "application/json"
            prepared.headers["Content-Length"] = str(len(body))
        return prepared

    def fetch(
        self, account: AccountConfig, version: int, known_sha256: str | None = None
    ) -> Fetched:
        """The decoded success answer for `account`, or a `FetchError` saying what went wrong.

        Retries transient failures up to `api.retries` times; the error or the answer records
        how many attempts it took. A body whose SHA-256 is `known_sha256` comes back unchanged
        and undecoded (`Fetched.unchanged`).
        """
        redactor = self._redactor.with_secrets(account.secrets())
        retrying = Retrying(
            stop=stop_after_attempt(self._api.retries + 1),
            wait=self._wait,
            retry=retry_if_exception(lambda e: isinstance(e, FetchError) and is_retryable(e)),
            sleep=self._sleep,
            before_sleep=self._log_retry,
            reraise=True,
        )
        attempt_number = 0
        try:
            for attempt in retrying:
                with attempt:
                    attempt_number = attempt.retry_state.attempt_number
                    fetched = self._fetch_once(account, version, known_sha256)
                    return replace(fetched, attempts=attempt_number)
        except FetchError as exc:
            exc.attempts = attempt_number
            exc.message = redactor.redact(exc.message)
            raise
        raise AssertionError("unreachable: tenacity either returns or reraises")

    def _wait(self, state: RetryCallState) -> float:
        """Exponential backoff with jitter, or longer if the server asked (capped)."""
        backoff = self._backoff(state)
        error = state.outcome.exception() if state.outcome else None
        asked = error.retry_after if isinstance(error, FetchError) else None
        if asked is None:
            return float(backoff)
        return min(max(float(backoff), asked), self._api.retry_after_max_s)

    def _log_retry(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, FetchError):
            log.info(
                "account.retrying",
                attempt=state.attempt_number,
                error_kind=str(error.kind),
                http_status=error.http_status,
                wait_s=round(state.upcoming_sleep, 3),
            )

    def _fetch_once(
        self, account: AccountConfig, version: int, known_sha256: str | None
    ) -> Fetched:
        adapter = adapter_for(version)
        request = adapter.request(self._api, account)
        answer = self._send(request)
        status = answer.status
        if status == 200:  # an error status is reported as such, whatever its body's type
            _check_content_type(answer.content_type, answer.body)
        sha256 = hashlib.sha256(answer.body).hexdigest()
        if status == 200 and sha256 == known_sha256:
            return Fetched(account.username, version, None, None, status, 1, sha256)
        retry_after = answer.pause if status in (429, 503) else None
        try:
            payload = _parse_json(_decode(answer.body, status), status, answer.content_type)
        except FetchError as exc:
            exc.retry_after = retry_after
            raise
        if status != 200:
            reason = _api_error(payload) if isinstance(payload, Mapping) else "unexpected answer"
            raise FetchError(
                _kind_for_status(status),
                f"HTTP {status}: {reason}",
                http_status=status,
                retry_after=retry_after,
            )
        try:
            checked = adapter.check(payload, account.username)
        except InvalidPayloadError as exc:
            raise FetchError(ErrorKind.INVALID_RESPONSE, str(exc), http_status=status) from exc
        except FetchError as exc:
            exc.http_status = status
            raise
        return Fetched(
            account.username, version, answer.body.decode("utf-8"), checked, status, 1, sha256
        )

    def _send(self, request: Request) -> _Answer:
        if not self._gate.wait_turn():
            raise Stopped("stopped before the request was sent")
        timeout = self._api.timeout_s
        # The whole answer (connect, head and body) must be in by then; waiting for our turn
        # at the gate is not the server's time.
        deadline = time.monotonic() + timeout
        session = self._session()
        try:
            response = session.send(
                self._prepare(session, request),
                timeout=(timeout, timeout),
                stream=True,
                allow_redirects=False,  # never carry credentials to another host
                proxies=session.proxies,
                verify=session.verify,
                cert=session.cert,
            )
        except requests.Timeout as exc:
            raise FetchError(ErrorKind.TIMEOUT, f"no answer within {timeout:g}s") from exc
        except requests.RequestException as exc:
            raise FetchError(ErrorKind.CONNECTION, f"connection failed: {exc}") from exc
        with response:
            status = response.status_code
            pause = server_pause(response.headers, datetime.now(UTC))
            if pause is not None:
                pause = min(pause, self._api.retry_after_max_s)
                if status == 429 or (status < 300 and pause > 0):
                    self._gate.pause_for(pause)  # the budget is shared: every worker waits
            if 300 <= status < 400:
                raise FetchError(
                    ErrorKind.HTTP, f"HTTP {status}: redirect not followed", http_status=status
                )
            body = self._read_limited(response, deadline)
            return _Answer(status, response.headers.get("Content-Type", ""), body, pause)

    def _read_limited(self, response: requests.Response, deadline: float) -> bytes:
        """The body, refusing to hold more than the configured limit in memory, or to wait for
        it past `deadline`.

        requests' timeout bounds each socket read, not the answer: a server sending a few bytes
        a second would hold this worker as long as it pleased. So the body is read as it comes
        (`read1`: at most one socket read each), with the clock checked before every read and
        that read's own timeout cut to the time left.
        """
        limit = self._api.max_body_bytes
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            raise FetchError(
                ErrorKind.TOO_LARGE,
                f"body of {int(declared)} bytes exceeds the {limit}-byte limit",
                http_status=response.status_code,
            )
        raw = response.raw
        chunks: list[bytes] = []
        size = 0
        try:
            while True:
                self._bound_next_read(raw, deadline, size, response.status_code)
                chunk = raw.read1(_CHUNK, decode_content=True)
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    raise FetchError(
                        ErrorKind.TOO_LARGE,
                        f"body exceeds the {limit}-byte limit",
                        http_status=response.status_code,
                    )
                chunks.append(chunk)
        except urllib3.exceptions.ReadTimeoutError as exc:
            # Each read may wait only the time left, so a read timing out means it is spent.
            raise self._too_slow(size, response.status_code) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise FetchError(
                ErrorKind.CONNECTION, f"connection broke while reading the answer: {exc}"
            ) from exc
        return b"".join(chunks)

    def _bound_next_read(
        self, raw: urllib3.BaseHTTPResponse, deadline: float, size: int, status: int
    ) -> None:
        """Fail once `deadline` has passed; else let the next socket read wait only until it."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise self._too_slow(size, status)
        if left < self._api.timeout_s:
            # Reset by urllib3 before the connection's next request, so this cut stays here.
            sock = getattr(raw.connection, "sock", None)
            if sock is not None:
                sock.settimeout(left)

    def _too_slow(self, size: int, status: int) -> FetchError:
        return FetchError(
            ErrorKind.TIMEOUT,
            f"the body took longer than {self._api.timeout_s:g}s to arrive ({size} bytes by then)",
            http_status=status,
        )


# Content types that say JSON: application/json and any structured-syntax */*+json, whatever
# their parameters (charset=utf-8).
def _is_json_type(content_type: str) -> bool:
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or ("/" in media and media.endswith("+json"))


def _check_content_type(content_type: str, body: bytes) -> None:
    """A success answer must say it is JSON; an HTML page (Cloudflare's) is named as such.

    An absent header is tolerated: the body is still parsed and every field checked, and
    failing a well-formed answer because a proxy dropped a header would fail accounts for
    nothing. A header that names another type is believed: the server says it is not JSON.
    """
    if content_type == "application/json" or not content_type or _is_json_type(content_type):
        return
    shown = content_type[:100]
    if "html" in content_type.lower() or body[:64].lstrip().startswith(b"<"):
        message = f"expected JSON, got an HTML page ({shown})"
    else:
        message = f"content type: expected application/json, got {shown}"
    raise FetchError(ErrorKind.INVALID_RESPONSE, message, http_status=200)


def _decode(raw: bytes, status: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FetchError(
            ErrorKind.INVALID_RESPONSE,
            f"body is not UTF-8 (byte {exc.start})",
            http_status=status,
        ) from exc


def _parse_json(text: str, status: int, content_type: str) -> object:
    if not text.strip():
        if status != 200:
            raise FetchError(_kind_for_status(status), f"HTTP {status}", http_status=status)
        raise FetchError(ErrorKind.INVALID_RESPONSE, "empty body", http_status=status)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        if status != 200:
            raise FetchError(
                _kind_for_status(status),
                f"HTTP {status} ({content_type or 'no content type'})",
                http_status=status,
            ) from exc
        if "html" in content_type.lower() or text.lstrip().startswith("<"):
            what = f"an HTML page ({content_type or 'no content type'})"
        else:
            what = f"invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        raise FetchError(
            ErrorKind.INVALID_RESPONSE, f"expected JSON, got {what}", http_status=status
        ) from exc
