"""Keeping secrets out of everything we write: logs, error messages and tables.

Secrets are known values (the api key, passwords, their SHA-1, tokens). Any text that leaves the
program goes through a `Redactor` that replaces them with ``***``. Errors are redacted where they
are made, with the secrets of the account at hand; the log pipeline redacts every line again with
the global secrets and those of the account being processed (`account_secrets`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

MASK = "***"

# Too short to be a real secret, and replacing them would shred ordinary text.
_MIN_SECRET_LENGTH = 4


class Redactor:
    """Replaces every occurrence of a known secret in a text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first, so a secret that contains another is masked whole.
        self._secrets = tuple(
            sorted(
                {s for s in secrets if s and len(s) >= _MIN_SECRET_LENGTH}, key=len, reverse=True
            )
        )
        # How each secret looks inside a JSON string (quotes, backslashes and control
        # characters are escaped there), for `found_in` a rendered line.
        self._json_forms = tuple(
            {form for secret in self._secrets for form in (secret, _json_form(secret))}
        )

    def __bool__(self) -> bool:
        return bool(self._secrets)

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text

    def found_in(self, text: str) -> bool:
        """Whether a secret appears in `text`, as it is or as JSON would escape it."""
        return any(form in text for form in self._json_forms)

    def with_secrets(self, more: Iterable[str]) -> Redactor:
        return Redactor((*self._secrets, *more))


def _json_form(secret: str) -> str:
    return json.dumps(secret, ensure_ascii=False)[1:-1]


_account_secrets: ContextVar[Redactor | None] = ContextVar("account_secrets", default=None)
_NO_SECRETS = Redactor()


@contextmanager
def account_secrets(secrets: Iterable[str]) -> Iterator[None]:
    """Within this block (in this thread), log lines are also redacted of these secrets."""
    token = _account_secrets.set(Redactor(secrets))
    try:
        yield
    finally:
        _account_secrets.reset(token)


def current_account_redactor() -> Redactor:
    return _account_secrets.get() or _NO_SECRETS
