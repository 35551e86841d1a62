"""Payload → `Snapshot`: validating and normalizing one account's settings, per API version.

Pure functions over decoded JSON. Every field the normalizer uses is type-checked, and a wrong one
raises `InvalidPayloadError` naming its path (``profile.age: expected integer, got "thirty"``).
Fields the normalizer does not know are not errors: their paths are reported in
`Snapshot.unknown_paths` (logged as ``schema.drift``), and the raw body keeps them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeGuard

from etl.errors import InvalidPayloadError
from etl.records import CONNECTION_FLAGS, PROFILE_FIELDS, Entity, EntityRow, Snapshot, Value

# Top-level keys of a v1 answer that are envelope, not settings.
_V1_ENVELOPE = frozenset({"status", "message"})
_V1_SECTIONS = ("profile", "account", "viewing", "connections", "sharing_text")

# Longest text we accept in a short field; longer means the payload is not what we think it is.
_MAX_TEXT = 65_536


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return "an object" if isinstance(value, dict) else "an array"
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def _expect(path: str, expected: str, value: object) -> InvalidPayloadError:
    return InvalidPayloadError(path, f"expected {expected}, got {_describe(value)}")


def _text(path: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _expect(path, "string", value)
    if len(value) > _MAX_TEXT:
        raise InvalidPayloadError(path, f"text longer than {_MAX_TEXT} characters")
    return value


def _integer(path: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _expect(path, "integer", value)
    return value


def _boolean(path: str, value: object) -> bool | None:
    if value is None:
        return None
    if not isinstance(value, bool):
        raise _expect(path, "boolean", value)
    return value


def _unix_time(path: str, value: object) -> datetime | None:
    seconds = _integer(path, value)
    if seconds is None:
        return None
    try:
        return datetime.fromtimestamp(seconds, tz=UTC)
    except (OverflowError, OSError, ValueError) as exc:
        raise InvalidPayloadError(path, f"not a valid unix time: {seconds}") from exc


def _is_object(value: object) -> TypeGuard[Mapping[str, Any]]:
    # Decoded JSON objects are dicts; the ABC check for Mapping alone cost a fifth of normalizing.
    return isinstance(value, (dict, Mapping))


def _section(payload: Mapping[str, Any], path: str) -> Mapping[str, Any]:
    """The object at `path` (dotted).

    A missing section is an invalid payload, not an empty one: reading it as empty would close
    every connection row on an API hiccup (CONTRACT: failure is not deletion).
    """
    node: Any = payload
    walked: list[str] = []
    for part in path.split("."):
        walked.append(part)
        if not _is_object(node) or part not in node:
            raise InvalidPayloadError(".".join(walked), "missing section")
        node = node[part]
    if not _is_object(node):
        raise _expect(path, "an object", node)
    return node


Reader = Callable[[str, object], Value]

# (section path, key in the payload, column, reader)
_V1_PROFILE: tuple[tuple[str, str, str, Reader], ...] = (
    ("profile", "username", "username", _text),
    ("profile", "full_name", "full_name", _text),
    ("profile", "gender", "gender", _text),
    ("profile", "age", "age", _integer),
    ("profile", "location", "location", _text),
    ("profile", "about", "about", _text),
    ("profile", "joined", "joined_at", _unix_time),
    ("profile", "last_login", "last_login_at", _unix_time),
    ("profile", "avatar", "avatar_url", _text),
    ("profile", "url", "profile_url", _text),
    ("profile", "vip", "vip", _boolean),
    ("account", "timezone", "timezone", _text),
    ("account", "use_24hr", "use_24hr", _boolean),
    ("account", "protected", "protected", _boolean),
    ("viewing.ratings", "mode", "ratings_mode", _text),
    ("viewing.shouts", "show_badges", "show_badges", _boolean),
    ("viewing.shouts", "show_spoilers", "show_spoilers", _boolean),
)
_V1_PROFILE_SECTIONS = tuple(dict.fromkeys(section for section, _, _, _ in _V1_PROFILE))
_V1_KNOWN_PATHS = frozenset(
    {f"{section}.{key}" for section, key, _, _ in _V1_PROFILE}
    | {"viewing.ratings", "viewing.shouts"}
)


def check_v1_envelope(payload: object, username: str) -> Mapping[str, Any]:
    """The decoded body as a mapping, if it is a success answer for `username`.

    Raises `InvalidPayloadError` for a wrong shape or a different user; a `"status": "failure"`
    answer is reported by the caller (it is an API failure, not a malformed payload).
    """
    if not _is_object(payload):
        raise _expect("", "a JSON object", payload)
    status = payload.get("status")
    if status is not None and status != "success":
        raise _expect("status", '"success"', status)
    returned = _section(payload, "profile").get("username")
    if returned != username:
        raise InvalidPayloadError(
            "profile.username", f"expected {_describe(username)}, got {_describe(returned)}"
        )
    return payload


def from_v1(payload: Mapping[str, Any]) -> Snapshot:
    """Normalize a v1 ``account/settings`` success answer into rows."""
    for name in _V1_SECTIONS:
        _section(payload, name)
    sections = {path: _section(payload, path) for path in _V1_PROFILE_SECTIONS}
    profile_values: dict[str, Value] = dict.fromkeys(PROFILE_FIELDS)
    for section_path, key, column, read in _V1_PROFILE:
        profile_values[column] = read(f"{section_path}.{key}", sections[section_path].get(key))
    connections = tuple(
        _v1_connection(network, flags)
        for network, flags in sorted(_section(payload, "connections").items())
    )
    sharing_texts = tuple(
        EntityRow(Entity.SHARING_TEXT, action, {"text": _text(f"sharing_text.{action}", text)})
        for action, text in sorted(_section(payload, "sharing_text").items())
    )
    return Snapshot(
        profile=EntityRow(Entity.PROFILE, None, profile_values),
        connections=connections,
        sharing_texts=sharing_texts,
        unknown_paths=tuple(sorted(_v1_unknown_paths(payload))),
    )


def _v1_connection(network: str, flags: object) -> EntityRow:
    path = f"connections.{network}"
    if not _is_object(flags):
        raise _expect(path, "an object", flags)
    values: dict[str, Value] = {
        flag: _boolean(f"{path}.{flag}", flags.get(flag)) for flag in CONNECTION_FLAGS
    }
    return EntityRow(Entity.CONNECTION, network, values)


def _v1_unknown_paths(payload: Mapping[str, Any]) -> set[str]:
    """Paths in the payload that the v1 normalizer does not read (networks and actions are data)."""
    unknown: set[str] = set()
    for key, value in payload.items():
        if key in _V1_ENVELOPE:
            continue
        if key not in _V1_SECTIONS:
            unknown.add(key)
        elif key == "connections":
            for network, flags in value.items():
                unknown.update(
                    f"connections.{network}.{flag}"
                    for flag in flags
                    if flag not in CONNECTION_FLAGS
                )
        elif key != "sharing_text":
            unknown.update(_walk_unknown(key, value))
    return unknown


def _walk_unknown(prefix: str, node: Mapping[str, Any]) -> set[str]:
    unknown: set[str] = set()
    for key, value in node.items():
        path = f"{prefix}.{key}"
        if path in _V1_KNOWN_PATHS:
            if _is_object(value) and path in ("viewing.ratings", "viewing.shouts"):
                unknown.update(_walk_unknown(path, value))
            continue
        unknown.add(path)
    return unknown
