"""Plain data of the pure core: an account's normalized settings, and changes between two.

No IO here. The normalizer builds a `Snapshot`, the differ compares two, the history writer stores
them. Field order in the tuples below is the column order of the history tables.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

PROFILE_FIELDS: tuple[str, ...] = (
    "username",
    "full_name",
    "gender",
    "age",
    "location",
    "about",
    "joined_at",
    "last_login_at",
    "avatar_url",
    "profile_url",
    "vip",
    "timezone",
    "use_24hr",
    "protected",
    "ratings_mode",
    "show_badges",
    "show_spoilers",
    # sent by API v2 only; NULL for v1
    "private",
    "vip_ep",
    "slug",
    "uuid",
    "date_format",
    "cover_image_url",
)

CONNECTION_FLAGS: tuple[str, ...] = (
    "connected",
    "timeline_enabled",
    "share_scrobbles_start",
    "share_scrobbles_end",
    "share_tv",
    "share_movies",
    "share_ratings",
    "share_checkins",
)

Value = str | int | bool | datetime | None


class Entity(StrEnum):
    PROFILE = "profile"
    CONNECTION = "connection"
    SHARING_TEXT = "sharing_text"


class ChangeKind(StrEnum):
    ADDED = "added"
    CHANGED = "changed"
    REMOVED = "removed"


def jsonable(value: Value) -> str | int | bool | None:
    """A value as it appears in JSON: datetimes become ISO-8601 UTC strings."""
    if isinstance(value, datetime):
        # The same instant must give the same text (and row_hash) whatever offset it carries.
        return value.astimezone(UTC).isoformat() if value.tzinfo else value.isoformat()
    return value


def row_hash(values: dict[str, Value]) -> str:
    """A stable fingerprint of a row's tracked values, stored as `row_hash`."""
    canonical = json.dumps(
        {k: jsonable(v) for k, v in values.items()},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class EntityRow:
    """One tracked row: the entity, its key within the account, and its values."""

    entity: Entity
    key: str | None  # network for connections, action for sharing texts, None for the profile
    values: dict[str, Value]
    digest: str = field(default="", compare=False)  # row_hash of values

    def __post_init__(self) -> None:
        if not self.digest:
            object.__setattr__(self, "digest", row_hash(self.values))

    @property
    def identity(self) -> tuple[Entity, str | None]:
        return (self.entity, self.key)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One account's settings at one moment, normalized into rows."""

    profile: EntityRow
    connections: tuple[EntityRow, ...]
    sharing_texts: tuple[EntityRow, ...]
    unknown_paths: tuple[str, ...] = ()

    def rows(self) -> tuple[EntityRow, ...]:
        return (self.profile, *self.connections, *self.sharing_texts)


@dataclass(frozen=True, slots=True)
class Change:
    """One difference between the stored and the fetched settings of an account.

    `field` is None when a whole row is added or removed; `old`/`new` then hold the whole row.
    """

    entity: Entity
    key: str | None
    field: str | None
    change: ChangeKind
    old: Any
    new: Any

    def as_log(self) -> dict[str, Any]:
        """The shape of one item of `changes` in the `account.changed` log event."""
        return {
            "entity": str(self.entity),
            "key": self.key,
            "field": self.field,
            "change": str(self.change),
            "old": self.old,
            "new": self.new,
        }
