"""Unit tests for etl.normalize: v1 payloads validated and normalized into rows."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from etl.errors import InvalidPayloadError
from etl.fakeapi import sample_settings
from etl.normalize import check_v1_envelope, from_v1
from etl.records import CONNECTION_FLAGS, PROFILE_FIELDS, Entity

V2_ONLY_COLUMNS = ("private", "vip_ep", "slug", "uuid", "date_format", "cover_image_url")

# The example response of the seed API page, as the profile row it must become.
SEED_PROFILE: dict[str, Any] = {
    "username": "justin",
    "full_name": "Justin",
    "gender": "male",
    "age": 30,
    "location": "San Diego, CA",
    "about": (
        "Co-founder of trakt. Please use the feedback tab on the right side to leave us "
        "suggestions or bugs you come across. Hope you're enjoying the site!"
    ),
    "joined_at": datetime(2010, 9, 25, 17, 49, 25, tzinfo=UTC),
    "last_login_at": datetime(2012, 4, 20, 6, 3, 21, tzinfo=UTC),
    "avatar_url": "http://trakt.us/images/avatars/1.4.jpg",
    "profile_url": "http://trakt.tv/user/justin",
    "vip": True,
    "timezone": "UM8",
    "use_24hr": False,
    "protected": False,
    "ratings_mode": "advanced",
    "show_badges": False,
    "show_spoilers": False,
    "private": None,
    "vip_ep": None,
    "slug": None,
    "uuid": None,
    "date_format": None,
    "cover_image_url": None,
}


@pytest.fixture
def payload() -> dict[str, Any]:
    """The seed page's success answer for justin, envelope included."""
    return {"status": "success", "message": "All settings for justin", **sample_settings("justin")}


def _set(payload: dict[str, Any], path: str, value: object) -> None:
    *parents, last = path.split(".")
    node = payload
    for part in parents:
        node = node[part]
    node[last] = value


def _delete(payload: dict[str, Any], path: str) -> None:
    *parents, last = path.split(".")
    node = payload
    for part in parents:
        node = node[part]
    del node[last]


def test_from_v1__seed_example_gives_the_profile_row(payload: dict[str, Any]) -> None:
    """The seed example becomes exactly the documented profile row, v2-only columns None."""
    profile = from_v1(payload).profile

    assert profile.entity is Entity.PROFILE
    assert profile.key is None
    assert profile.values == SEED_PROFILE
    assert tuple(profile.values) == PROFILE_FIELDS


def test_from_v1__unix_seconds_become_aware_utc_datetimes(payload: dict[str, Any]) -> None:
    """`joined` and `last_login` (unix seconds) become timezone-aware UTC datetimes."""
    values = from_v1(payload).profile.values

    for column, seconds in (("joined_at", 1285436965), ("last_login_at", 1334901801)):
        moment = values[column]
        assert isinstance(moment, datetime)
        assert moment.utcoffset() is not None
        assert moment.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
        assert moment.timestamp() == seconds


def test_from_v1__v2_only_columns_are_none(payload: dict[str, Any]) -> None:
    """Columns only API v2 sends are None for a v1 payload."""
    values = from_v1(payload).profile.values

    assert {column: values[column] for column in V2_ONLY_COLUMNS} == dict.fromkeys(V2_ONLY_COLUMNS)


def test_from_v1__one_connection_row_per_network(payload: dict[str, Any]) -> None:
    """Each network becomes one connection row keyed by its name, with every flag column."""
    connections = from_v1(payload).connections

    assert [row.key for row in connections] == ["facebook", "tumblr", "twitter"]
    assert all(row.entity is Entity.CONNECTION for row in connections)
    assert all(tuple(row.values) == CONNECTION_FLAGS for row in connections)
    assert connections[0].values == dict.fromkeys(CONNECTION_FLAGS, True)


def test_from_v1__missing_connection_flag_is_none(payload: dict[str, Any]) -> None:
    """A flag a network does not send (twitter's timeline_enabled) is None, not False."""
    twitter = {row.key: row for row in from_v1(payload).connections}["twitter"]

    assert twitter.values == {
        "connected": True,
        "timeline_enabled": None,
        "share_scrobbles_start": False,
        "share_scrobbles_end": False,
        "share_tv": True,
        "share_movies": True,
        "share_ratings": False,
        "share_checkins": False,
    }


def test_from_v1__one_sharing_text_row_per_action(payload: dict[str, Any]) -> None:
    """Each sharing action becomes one row keyed by the action, holding its text."""
    texts = from_v1(payload).sharing_texts

    assert [(row.entity, row.key, row.values) for row in texts] == [
        (Entity.SHARING_TEXT, "watched", {"text": "I just watched [item]"}),
        (Entity.SHARING_TEXT, "watching", {"text": "I'm watching [item]"}),
    ]


def test_from_v1__seed_example_with_envelope_has_no_unknown_paths(
    payload: dict[str, Any],
) -> None:
    """The documented payload, `status` and `message` included, reports no schema drift."""
    assert from_v1(payload).unknown_paths == ()


def test_from_v1__empty_connections_gives_no_connection_rows(payload: dict[str, Any]) -> None:
    """An empty `connections` object is valid and means no networks (so rows get closed)."""
    payload["connections"] = {}

    assert from_v1(payload).connections == ()


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("profile.age", "thirty", 'expected integer, got "thirty"'),
        ("profile.age", True, "expected integer, got true"),
        ("profile.age", 30.5, "expected integer, got 30.5"),
        ("profile.joined", "1285436965", 'expected integer, got "1285436965"'),
        ("profile.last_login", False, "expected integer, got false"),
        ("profile.full_name", 42, "expected string, got 42"),
        ("profile.avatar", {"full": "x"}, "expected string, got an object"),
        ("profile.vip", "true", 'expected boolean, got "true"'),
        ("account.timezone", ["UM8"], "expected string, got an array"),
        ("account.use_24hr", 0, "expected boolean, got 0"),
        ("account.protected", "false", 'expected boolean, got "false"'),
        ("viewing.ratings.mode", 10, "expected string, got 10"),
        ("viewing.shouts.show_spoilers", "no", 'expected boolean, got "no"'),
        ("connections.twitter.share_tv", 1, "expected boolean, got 1"),
        ("connections.facebook.connected", "yes", 'expected boolean, got "yes"'),
        ("sharing_text.watched", 5, "expected string, got 5"),
    ],
)
def test_from_v1__wrong_type_names_the_path(
    payload: dict[str, Any], path: str, value: object, expected: str
) -> None:
    """A field of the wrong type raises an error naming its path, what was expected and got."""
    _set(payload, path, value)

    with pytest.raises(InvalidPayloadError) as caught:
        from_v1(payload)

    assert str(caught.value) == f"{path}: {expected}"
    assert caught.value.path == path


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("profile", "justin", 'profile: expected an object, got "justin"'),
        ("connections", None, "connections: expected an object, got null"),
        ("connections", [], "connections: expected an object, got an array"),
        ("connections.twitter", True, "connections.twitter: expected an object, got true"),
        ("viewing.ratings", "advanced", 'viewing.ratings: expected an object, got "advanced"'),
        ("sharing_text", None, "sharing_text: expected an object, got null"),
    ],
)
def test_from_v1__section_of_wrong_type_names_the_section(
    payload: dict[str, Any], path: str, value: object, expected: str
) -> None:
    """A section that is not an object (`connections: null`) raises naming the section."""
    _set(payload, path, value)

    with pytest.raises(InvalidPayloadError) as caught:
        from_v1(payload)

    assert str(caught.value) == expected
    assert caught.value.path == path


@pytest.mark.parametrize(
    "section",
    [
        "profile",
        "account",
        "viewing",
        "connections",
        "sharing_text",
        "viewing.ratings",
        "viewing.shouts",
    ],
)
def test_from_v1__missing_section_names_it(payload: dict[str, Any], section: str) -> None:
    """A missing section is an invalid payload naming the section, never an empty one."""
    _delete(payload, section)

    with pytest.raises(InvalidPayloadError) as caught:
        from_v1(payload)

    assert str(caught.value) == f"{section}: missing section"
    assert caught.value.path == section


@pytest.mark.parametrize(
    ("path", "column"),
    [
        ("profile.age", "age"),
        ("profile.full_name", "full_name"),
        ("profile.joined", "joined_at"),
        ("profile.avatar", "avatar_url"),
        ("profile.vip", "vip"),
        ("account.timezone", "timezone"),
        ("account.use_24hr", "use_24hr"),
        ("viewing.ratings.mode", "ratings_mode"),
        ("viewing.shouts.show_badges", "show_badges"),
    ],
)
def test_from_v1__null_profile_field_is_none(
    payload: dict[str, Any], path: str, column: str
) -> None:
    """A null field is accepted and stored as None."""
    _set(payload, path, None)

    assert from_v1(payload).profile.values[column] is None


def test_from_v1__null_connection_flag_and_sharing_text_are_none(
    payload: dict[str, Any],
) -> None:
    """A null connection flag or sharing text is accepted and stored as None."""
    payload["connections"]["facebook"]["share_tv"] = None
    payload["sharing_text"]["watched"] = None

    snapshot = from_v1(payload)

    assert snapshot.connections[0].values["share_tv"] is None
    assert snapshot.sharing_texts[0].values == {"text": None}


def test_from_v1__missing_profile_field_is_none(payload: dict[str, Any]) -> None:
    """A field absent from its section is None, and the rest of the row is kept."""
    del payload["profile"]["location"]

    values = from_v1(payload).profile.values

    assert values["location"] is None
    assert values["full_name"] == "Justin"


def test_from_v1__out_of_range_unix_time_names_the_path(payload: dict[str, Any]) -> None:
    """A unix time no datetime can hold raises an error naming the field."""
    payload["profile"]["last_login"] = 10**20

    with pytest.raises(InvalidPayloadError) as caught:
        from_v1(payload)

    assert caught.value.path == "profile.last_login"
    assert "not a valid unix time" in str(caught.value)


def test_from_v1__overlong_text_names_the_path(payload: dict[str, Any]) -> None:
    """An absurdly long text field is rejected, naming the field."""
    payload["profile"]["about"] = "x" * 70_000

    with pytest.raises(InvalidPayloadError) as caught:
        from_v1(payload)

    assert caught.value.path == "profile.about"


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("premium", True),
        ("profile.images", {"avatar": {"full": "http://x/a.jpg"}}),
        ("account.locale", "en"),
        ("viewing.ratings.scale", 10),
        ("viewing.shouts.show_avatars", True),
        ("viewing.lists", {"sort": "rank"}),
        ("connections.facebook.share_lists", True),
    ],
)
def test_from_v1__unknown_field_is_reported_not_rejected(
    payload: dict[str, Any], path: str, value: object
) -> None:
    """An extra field anywhere lands in `unknown_paths`, and the known rows are unchanged."""
    _set(payload, path, value)

    snapshot = from_v1(payload)

    assert snapshot.unknown_paths == (path,)
    assert snapshot.profile.values == SEED_PROFILE
    assert [row.key for row in snapshot.connections] == ["facebook", "tumblr", "twitter"]


def test_from_v1__several_unknown_fields_are_all_reported_sorted(
    payload: dict[str, Any],
) -> None:
    """Every unknown path is reported once, in sorted order."""
    payload["zeta"] = 1
    payload["account"]["locale"] = "en"
    payload["connections"]["twitter"]["share_lists"] = False

    assert from_v1(payload).unknown_paths == (
        "account.locale",
        "connections.twitter.share_lists",
        "zeta",
    )


def test_from_v1__new_network_is_data_not_drift(payload: dict[str, Any]) -> None:
    """A network the API adds becomes a connection row, not schema drift."""
    payload["connections"]["mastodon"] = {"connected": True, "share_tv": False}

    snapshot = from_v1(payload)

    assert snapshot.unknown_paths == ()
    mastodon = {row.key: row for row in snapshot.connections}["mastodon"]
    assert mastodon.values == {
        **dict.fromkeys(CONNECTION_FLAGS),
        "connected": True,
        "share_tv": False,
    }


def test_from_v1__new_sharing_action_is_data_not_drift(payload: dict[str, Any]) -> None:
    """A sharing action the API adds becomes a sharing text row, not schema drift."""
    payload["sharing_text"]["rated"] = "I rated [item]"

    snapshot = from_v1(payload)

    assert snapshot.unknown_paths == ()
    assert [row.key for row in snapshot.sharing_texts] == ["rated", "watched", "watching"]
    assert snapshot.sharing_texts[0].values == {"text": "I rated [item]"}


def test_check_v1_envelope__accepts_a_success_answer_for_the_user(
    payload: dict[str, Any],
) -> None:
    """A success answer for the requested user is returned as is."""
    assert check_v1_envelope(payload, "justin") is payload


@pytest.mark.parametrize("body", [[], "justin", None, 42, True])
def test_check_v1_envelope__rejects_a_non_object(body: object) -> None:
    """A body that is not a JSON object is an invalid payload."""
    with pytest.raises(InvalidPayloadError, match="expected a JSON object"):
        check_v1_envelope(body, "justin")


def test_check_v1_envelope__rejects_a_wrong_username(payload: dict[str, Any]) -> None:
    """An answer about another user is rejected, naming both usernames."""
    with pytest.raises(InvalidPayloadError) as caught:
        check_v1_envelope(payload, "sean")

    assert str(caught.value) == 'profile.username: expected "sean", got "justin"'


def test_check_v1_envelope__rejects_a_non_success_status(payload: dict[str, Any]) -> None:
    """A `"status": "failure"` answer is not accepted as settings."""
    with pytest.raises(InvalidPayloadError) as caught:
        check_v1_envelope({"status": "failure", "error": "failed authentication"}, "justin")

    assert caught.value.path == "status"
    assert str(caught.value) == 'status: expected "success", got "failure"'

    payload["status"] = "failure"
    with pytest.raises(InvalidPayloadError, match=r"^status: "):
        check_v1_envelope(payload, "justin")


def test_check_v1_envelope__rejects_an_answer_without_profile() -> None:
    """An object without a profile section cannot be checked and is rejected."""
    with pytest.raises(InvalidPayloadError) as caught:
        check_v1_envelope({"status": "success"}, "justin")

    assert str(caught.value) == "profile: missing section"
