"""Unit tests for etl.records: row fingerprints, JSON values and the change log shape."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from etl.records import (
    Change,
    ChangeKind,
    Entity,
    EntityRow,
    Snapshot,
    Value,
    jsonable,
    row_hash,
)

ROW: dict[str, Value] = {
    "username": "justin",
    "age": 30,
    "vip": True,
    "location": None,
    "joined_at": datetime(2010, 9, 25, 17, 49, 25, tzinfo=UTC),
}


def test_row_hash__stable_across_dict_order() -> None:
    """The same values in another key order have the same hash."""
    reordered = dict(reversed(list(ROW.items())))

    assert list(reordered) != list(ROW)
    assert row_hash(reordered) == row_hash(ROW)


def test_row_hash__is_a_sha256_hex_digest() -> None:
    """The hash is 64 lowercase hex characters, fitting the `row_hash` column."""
    digest = row_hash(ROW)

    assert len(digest) == 64
    assert set(digest) <= set("0123456789abcdef")


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("username", "sean"),
        ("age", 31),
        ("vip", False),
        ("vip", 1),
        ("location", ""),
        ("location", "San Diego, CA"),
        ("joined_at", datetime(2010, 9, 25, 17, 49, 26, tzinfo=UTC)),
    ],
)
def test_row_hash__differs_when_a_value_differs(column: str, value: Value) -> None:
    """Changing any one value (even True → 1, or None → "") changes the hash."""
    assert row_hash({**ROW, column: value}) != row_hash(ROW)


def test_row_hash__differs_when_a_column_is_added() -> None:
    """A row with one more column (even None) is a different row."""
    assert row_hash({**ROW, "gender": None}) != row_hash(ROW)


def test_row_hash__datetime_same_instant_same_hash() -> None:
    """Datetimes are hashed by instant: the same moment in another offset hashes the same."""
    pacific = ROW["joined_at"].astimezone(timezone(timedelta(hours=-7)))  # type: ignore[union-attr]

    assert row_hash({**ROW, "joined_at": pacific}) == row_hash(ROW)


def test_jsonable__datetime_is_iso_utc_string() -> None:
    """A datetime becomes an ISO-8601 string in UTC, whatever offset it carried."""
    utc = datetime(2010, 9, 25, 17, 49, 25, tzinfo=UTC)
    plus_two = datetime(2010, 9, 25, 19, 49, 25, tzinfo=timezone(timedelta(hours=2)))

    assert jsonable(utc) == "2010-09-25T17:49:25+00:00"
    assert jsonable(plus_two) == "2010-09-25T17:49:25+00:00"


@pytest.mark.parametrize("value", ["text", 30, True, False, None])
def test_jsonable__plain_values_are_unchanged(value: Value) -> None:
    """Strings, integers, booleans and None pass through as they are."""
    assert jsonable(value) is value


def test_entity_row__digest_defaults_to_row_hash() -> None:
    """A new row carries the row_hash of its values; a stored one keeps the hash given."""
    assert EntityRow(Entity.PROFILE, None, dict(ROW)).digest == row_hash(ROW)
    assert EntityRow(Entity.PROFILE, None, dict(ROW), "stored").digest == "stored"


def test_snapshot__rows_are_profile_connections_sharing_texts() -> None:
    """`rows()` lists the profile, then the connections, then the sharing texts."""
    profile = EntityRow(Entity.PROFILE, None, {"age": 30})
    facebook = EntityRow(Entity.CONNECTION, "facebook", {"connected": True})
    watched = EntityRow(Entity.SHARING_TEXT, "watched", {"text": "x"})

    snapshot = Snapshot(profile=profile, connections=(facebook,), sharing_texts=(watched,))

    assert snapshot.rows() == (profile, facebook, watched)


def test_change_as_log__has_exactly_the_contract_keys() -> None:
    """A change's log form has exactly entity, key, field, change, old and new."""
    change = Change(Entity.CONNECTION, "twitter", "share_tv", ChangeKind.CHANGED, False, True)

    assert set(change.as_log()) == {"entity", "key", "field", "change", "old", "new"}


def test_change_as_log__values_are_plain_json() -> None:
    """Entity and change kind are plain strings; the whole item serializes as JSON."""
    change = Change(Entity.SHARING_TEXT, "watched", None, ChangeKind.ADDED, None, {"text": "x"})

    logged = change.as_log()

    assert json.loads(json.dumps(logged)) == {
        "entity": "sharing_text",
        "key": "watched",
        "field": None,
        "change": "added",
        "old": None,
        "new": {"text": "x"},
    }
    assert type(logged["entity"]) is str
    assert type(logged["change"]) is str
