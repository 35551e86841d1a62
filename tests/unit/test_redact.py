"""Unit tests for etl.redact: masking known secrets, globally and per account."""

from __future__ import annotations

import threading

from etl.redact import MASK, Redactor, account_secrets, current_account_redactor


def test_redactor__masks_every_occurrence() -> None:
    """Each occurrence of a secret in the text is replaced by the mask."""
    redactor = Redactor(["s3cr3t-key"])

    text = redactor.redact("POST /account/settings/s3cr3t-key (key s3cr3t-key, again s3cr3t-key)")

    assert text == f"POST /account/settings/{MASK} (key {MASK}, again {MASK})"


def test_redactor__masks_several_secrets() -> None:
    """Every known secret is masked, not only the first."""
    redactor = Redactor(["apikey-123", "hunter22"])

    assert redactor.redact("apikey-123 and hunter22") == f"{MASK} and {MASK}"


def test_redactor__longest_secret_first() -> None:
    """A secret containing another is masked whole, leaving no tail of it behind."""
    redactor = Redactor(["pass", "password-long-one"])

    assert redactor.redact("x password-long-one y pass") == f"x {MASK} y {MASK}"


def test_redactor__ignores_too_short_and_empty_secrets() -> None:
    """Empty or very short "secrets" are ignored so ordinary text is not shredded."""
    redactor = Redactor(["", "a", "abc"])

    assert not redactor
    assert redactor.redact("a cab abc") == "a cab abc"


def test_redactor__text_without_secrets_is_unchanged() -> None:
    """Text holding no secret comes back as it was."""
    redactor = Redactor(["hunter22"])

    assert redactor
    assert redactor.redact("account.synced justin") == "account.synced justin"


def test_redactor__with_secrets_keeps_the_old_ones() -> None:
    """`with_secrets` adds secrets to those already known."""
    redactor = Redactor(["hunter22"]).with_secrets(["token-abc"])

    assert redactor.redact("hunter22 token-abc") == f"{MASK} {MASK}"


def test_account_secrets__apply_only_inside_the_block() -> None:
    """An account's secrets are masked within its block and no longer after it."""
    assert current_account_redactor().redact("pw-justin") == "pw-justin"

    with account_secrets(["pw-justin"]):
        assert current_account_redactor().redact("pw-justin") == MASK

    assert current_account_redactor().redact("pw-justin") == "pw-justin"


def test_account_secrets__nested_block_restores_the_outer_one() -> None:
    """Leaving an inner block brings back the outer block's secrets."""
    with account_secrets(["pw-outer"]):
        with account_secrets(["pw-inner"]):
            assert current_account_redactor().redact("pw-inner pw-outer") == f"{MASK} pw-outer"
        assert current_account_redactor().redact("pw-inner pw-outer") == f"pw-inner {MASK}"


def test_account_secrets__reset_after_an_exception() -> None:
    """An error inside the block does not leave the account's secrets behind."""
    try:
        with account_secrets(["pw-justin"]):
            raise RuntimeError("fetch failed")
    except RuntimeError:
        pass

    assert current_account_redactor().redact("pw-justin") == "pw-justin"


def test_account_secrets__are_per_thread() -> None:
    """Secrets set in one thread do not apply in another running at the same time."""
    inside = threading.Event()
    checked = threading.Event()
    seen: dict[str, str] = {}

    def worker() -> None:
        with account_secrets(["pw-worker"]):
            seen["worker"] = current_account_redactor().redact("pw-worker pw-main")
            inside.set()
            checked.wait(timeout=5)

    thread = threading.Thread(target=worker)
    with account_secrets(["pw-main"]):
        thread.start()
        assert inside.wait(timeout=5)
        seen["main"] = current_account_redactor().redact("pw-worker pw-main")
        checked.set()
        thread.join(timeout=5)

    assert seen == {"worker": f"{MASK} pw-main", "main": f"pw-worker {MASK}"}
