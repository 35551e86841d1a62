"""The differ: stored current rows vs freshly normalized rows → field-level `Change`s.

Pure. The same list feeds the `change_events` table and the `account.changed` log event, so the
two can never disagree.
"""

from __future__ import annotations

from collections.abc import Iterable

from etl.records import Change, ChangeKind, Entity, EntityRow, jsonable

_ENTITY_ORDER = {Entity.PROFILE: 0, Entity.CONNECTION: 1, Entity.SHARING_TEXT: 2}


def _order(identity: tuple[Entity, str | None]) -> tuple[int, str]:
    entity, key = identity
    return (_ENTITY_ORDER[entity], key or "")


def _whole(row: EntityRow) -> dict[str, object]:
    return {name: jsonable(value) for name, value in row.values.items()}


def diff_rows(current: Iterable[EntityRow], fetched: Iterable[EntityRow]) -> list[Change]:
    """What changed from `current` (stored) to `fetched`, in a stable order.

    A row present only in `fetched` is `added`, one present only in `current` is `removed`
    (absent is removal), and a row in both with a different hash yields one `changed` per field.
    """
    before = {row.identity: row for row in current}
    after = {row.identity: row for row in fetched}
    changes: list[Change] = []
    for identity in sorted(before.keys() | after.keys(), key=_order):
        old, new = before.get(identity), after.get(identity)
        entity, key = identity
        if old is None and new is not None:
            changes.append(Change(entity, key, None, ChangeKind.ADDED, None, _whole(new)))
        elif new is None and old is not None:
            changes.append(Change(entity, key, None, ChangeKind.REMOVED, _whole(old), None))
        elif old is not None and new is not None and old.digest != new.digest:
            changes.extend(_field_changes(old, new))
    return changes


def _field_changes(old: EntityRow, new: EntityRow) -> list[Change]:
    return [
        Change(
            new.entity,
            new.key,
            name,
            ChangeKind.CHANGED,
            jsonable(old.values.get(name)),
            jsonable(value),
        )
        for name, value in new.values.items()
        if old.values.get(name) != value
    ]
