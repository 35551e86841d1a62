"""Unit tests for etl.diff: stored rows vs fetched rows → field-level changes."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from typing import Any

import pytest

from etl.diff import diff_rows
from etl.fakeapi import sample_settings
from etl.normalize import from_v1
from etl.records import Change, ChangeKind, Entity, EntityRow, Snapshot


@pytest.fixture
def payload() -> dict[str, Any]:
    """The seed page's settings for justin."""
    return sample_settings("justin")


def _rows(payload: dict[str, Any]) -> tuple[EntityRow, ...]:
    return from_v1(payload).rows()


def _row(entity: Entity, key: str | None, **values: Any) -> EntityRow:
    return EntityRow(entity, key, values)


def test_diff_rows__identical_rows_give_no_changes(payload: dict[str, Any]) -> None:
    """Two normalizations of the same payload differ in nothing."""
    assert diff_rows(_rows(payload), _rows(sample_settings("justin"))) == []


def test_diff_rows__new_row_is_one_added_with_the_whole_row(payload: dict[str, Any]) -> None:
    """A row only in the fetched settings is one `added` change, field None, the row as `new`."""
    before = _rows(payload)
    payload["connections"]["mastodon"] = {"connected": True, "share_tv": False}

    changes = diff_rows(before, _rows(payload))

    assert changes == [
        Change(
            Entity.CONNECTION,
            "mastodon",
            None,
            ChangeKind.ADDED,
            None,
            {
                "connected": True,
                "timeline_enabled": None,
                "share_scrobbles_start": None,
                "share_scrobbles_end": None,
                "share_tv": False,
                "share_movies": None,
                "share_ratings": None,
                "share_checkins": None,
            },
        )
    ]


def test_diff_rows__vanished_row_is_one_removed_with_the_whole_row(
    payload: dict[str, Any],
) -> None:
    """A row only in the stored settings is one `removed` change, the row as `old`."""
    before = _rows(payload)
    del payload["sharing_text"]["watching"]

    changes = diff_rows(before, _rows(payload))

    assert changes == [
        Change(
            Entity.SHARING_TEXT,
            "watching",
            None,
            ChangeKind.REMOVED,
            {"text": "I'm watching [item]"},
            None,
        )
    ]


def test_diff_rows__changed_fields_give_one_change_each(payload: dict[str, Any]) -> None:
    """Each differing field of a row is one `changed` change with its old and new value."""
    before = _rows(payload)
    payload["profile"]["age"] = 31
    payload["profile"]["location"] = None
    payload["viewing"]["ratings"]["mode"] = "simple"

    changes = diff_rows(before, _rows(payload))

    assert changes == [
        Change(Entity.PROFILE, None, "age", ChangeKind.CHANGED, 30, 31),
        Change(Entity.PROFILE, None, "location", ChangeKind.CHANGED, "San Diego, CA", None),
        Change(Entity.PROFILE, None, "ratings_mode", ChangeKind.CHANGED, "advanced", "simple"),
    ]


def test_diff_rows__changed_connection_flag_is_keyed_by_network(
    payload: dict[str, Any],
) -> None:
    """A flag change on one network names that network and field only."""
    before = _rows(payload)
    payload["connections"]["twitter"]["share_ratings"] = True

    assert diff_rows(before, _rows(payload)) == [
        Change(Entity.CONNECTION, "twitter", "share_ratings", ChangeKind.CHANGED, False, True)
    ]


def test_diff_rows__changed_datetime_is_iso_strings(payload: dict[str, Any]) -> None:
    """A changed timestamp is reported as ISO-8601 UTC strings, JSON-ready."""
    before = _rows(payload)
    payload["profile"]["last_login"] = 1334901801 + 3600

    changes = diff_rows(before, _rows(payload))

    assert changes == [
        Change(
            Entity.PROFILE,
            None,
            "last_login_at",
            ChangeKind.CHANGED,
            "2012-04-20T06:03:21+00:00",
            "2012-04-20T07:03:21+00:00",
        )
    ]


def test_diff_rows__whole_row_values_are_jsonable(payload: dict[str, Any]) -> None:
    """An added profile carries its datetimes as ISO strings, so the change is JSON."""
    changes = diff_rows([], [from_v1(payload).profile])

    assert changes[0].new["joined_at"] == "2010-09-25T17:49:25+00:00"
    assert json.loads(json.dumps([c.as_log() for c in changes]))[0]["new"] == changes[0].new


def test_diff_rows__order_is_profile_then_connections_then_sharing_texts() -> None:
    """Changes come profile first, then connections by network, then sharing texts by action."""
    before = [
        _row(Entity.SHARING_TEXT, "watching", text="a"),
        _row(Entity.CONNECTION, "twitter", connected=True),
        _row(Entity.PROFILE, None, age=30),
        _row(Entity.CONNECTION, "facebook", connected=True),
    ]
    after = [
        _row(Entity.CONNECTION, "tumblr", connected=True),
        _row(Entity.SHARING_TEXT, "watching", text="b"),
        _row(Entity.CONNECTION, "facebook", connected=False),
        _row(Entity.SHARING_TEXT, "rated", text="r"),
        _row(Entity.PROFILE, None, age=31),
    ]

    expected = [
        (Entity.PROFILE, None, ChangeKind.CHANGED),
        (Entity.CONNECTION, "facebook", ChangeKind.CHANGED),
        (Entity.CONNECTION, "tumblr", ChangeKind.ADDED),
        (Entity.CONNECTION, "twitter", ChangeKind.REMOVED),
        (Entity.SHARING_TEXT, "rated", ChangeKind.ADDED),
        (Entity.SHARING_TEXT, "watching", ChangeKind.CHANGED),
    ]
    shuffler = random.Random(7)
    for _ in range(5):
        shuffler.shuffle(before)
        shuffler.shuffle(after)
        changes = diff_rows(before, after)
        assert [(c.entity, c.key, c.change) for c in changes] == expected


def test_diff_rows__first_sync_against_nothing_is_all_added(payload: dict[str, Any]) -> None:
    """With nothing stored, every fetched row is `added`, in the stable order."""
    snapshot: Snapshot = from_v1(payload)

    changes = diff_rows([], snapshot.rows())

    assert [(c.entity, c.key, c.field, c.change, c.old) for c in changes] == [
        (Entity.PROFILE, None, None, ChangeKind.ADDED, None),
        (Entity.CONNECTION, "facebook", None, ChangeKind.ADDED, None),
        (Entity.CONNECTION, "tumblr", None, ChangeKind.ADDED, None),
        (Entity.CONNECTION, "twitter", None, ChangeKind.ADDED, None),
        (Entity.SHARING_TEXT, "watched", None, ChangeKind.ADDED, None),
        (Entity.SHARING_TEXT, "watching", None, ChangeKind.ADDED, None),
    ]


def test_diff_rows__stored_row_with_same_values_is_unchanged() -> None:
    """A stored row rebuilt from the database (aware UTC datetimes) equals the fetched one."""
    moment = datetime(2012, 4, 20, 6, 3, 21, tzinfo=UTC)
    stored = _row(Entity.PROFILE, None, last_login_at=moment, age=30)
    fetched = _row(Entity.PROFILE, None, age=30, last_login_at=moment)

    assert diff_rows([stored], [fetched]) == []
