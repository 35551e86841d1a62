"""The trakt HTTP client: one adapter per API version behind one `TraktClient`.

An adapter knows its version's request and answer shapes (`V1Adapter`: POST
``account/settings/{apikey}``); the client knows HTTP: sessions, timeouts, the body size limit, and
translating every failure into a `FetchError` with a kind. Error texts are redacted here, where
the account's secrets are at hand; the v1 api key is a URL path segment, and `requests` puts URLs
into its exception messages.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import requests

from etl.config import AccountConfig, ApiConfig
from etl.errors import ErrorKind, FetchError, InvalidPayloadError
from etl.normalize import check_v1_envelope, from_v1
from etl.records import Snapshot
from etl.redact import Redactor

USER_AGENT = "trakt-etl/0.1 (+https://github.com/trakt-etl)"
_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    url: str
    json: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Fetched:
    """A success answer for one account, decoded but not yet normalized."""

    username: str
    api_version: int
    body: str  # the text received, stored in raw_payloads
    payload: Mapping[str, Any]
    http_status: int
    attempts: int


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


class TraktClient:
    """Fetches one account's settings; thread-safe as long as each thread has its own client."""

    def __init__(
        self,
        api: ApiConfig,
        *,
        session: requests.Session | None = None,
        redactor: Redactor | None = None,
    ) -> None:
        self._api = api
        self._session = session or requests.Session()
        self._session.headers.setdefault("User-Agent", USER_AGENT)
        self._redactor = redactor or Redactor()

    def close(self) -> None:
        self._session.close()

    def fetch(self, account: AccountConfig, version: int) -> Fetched:
        """The decoded success answer for `account`, or a `FetchError` saying what went wrong."""
        redactor = self._redactor.with_secrets(account.secrets())
        try:
            return self._fetch(account, version)
        except FetchError as exc:
            exc.message = redactor.redact(exc.message)
            exc.args = (f"{exc.kind}: {exc.message}",)
            raise

    def _fetch(self, account: AccountConfig, version: int) -> Fetched:
        adapter = adapter_for(version)
        request = adapter.request(self._api, account)
        status, content_type, raw = self._send(request)
        text = _decode(raw, status)
        payload = _parse_json(text, status, content_type)
        if status != 200:
            reason = _api_error(payload) if isinstance(payload, Mapping) else "unexpected answer"
            raise FetchError(
                _kind_for_status(status), f"HTTP {status}: {reason}", http_status=status
            )
        try:
            checked = adapter.check(payload, account.username)
        except InvalidPayloadError as exc:
            raise FetchError(ErrorKind.INVALID_RESPONSE, str(exc), http_status=status) from exc
        except FetchError as exc:
            exc.http_status = status
            raise
        return Fetched(account.username, version, text, checked, status, attempts=1)

    def _send(self, request: Request) -> tuple[int, str, bytes]:
        timeout = self._api.timeout_s
        try:
            response = self._session.request(
                request.method,
                request.url,
                json=request.json,
                headers=request.headers,
                timeout=(timeout, timeout),
                stream=True,
                allow_redirects=False,  # never carry credentials to another host
            )
        except requests.Timeout as exc:
            raise FetchError(ErrorKind.TIMEOUT, f"no answer within {timeout:g}s") from exc
        except requests.RequestException as exc:
            raise FetchError(ErrorKind.CONNECTION, f"connection failed: {exc}") from exc
        with response:
            if 300 <= response.status_code < 400:
                raise FetchError(
                    ErrorKind.HTTP,
                    f"HTTP {response.status_code}: redirect not followed",
                    http_status=response.status_code,
                )
            body = self._read_limited(response)
            return response.status_code, response.headers.get("Content-Type", ""), body

    def _read_limited(self, response: requests.Response) -> bytes:
        """The body, refusing to hold more than the configured limit in memory."""
        limit = self._api.max_body_bytes
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            raise FetchError(
                ErrorKind.TOO_LARGE,
                f"body of {int(declared)} bytes exceeds the {limit}-byte limit",
                http_status=response.status_code,
            )
        chunks: list[bytes] = []
        size = 0
        try:
            for chunk in response.iter_content(_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise FetchError(
                        ErrorKind.TOO_LARGE,
                        f"body exceeds the {limit}-byte limit",
                        http_status=response.status_code,
                    )
                chunks.append(chunk)
        except requests.Timeout as exc:
            raise FetchError(ErrorKind.TIMEOUT, "the answer stalled while being read") from exc
        except requests.RequestException as exc:
            raise FetchError(
                ErrorKind.CONNECTION, f"connection broke while reading the answer: {exc}"
            ) from exc
        return b"".join(chunks)


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
