"""The SCD type 2 history writer: current rows in, closed and new rows and change events out.

Explicit on purpose (no ORM flush hooks): `write_history` takes the account's current rows, the
fetched snapshot, the changes between them and the run's `as_of`, and issues the statements. The
caller owns the transaction, so one account's rows commit together or not at all.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Table, insert, select, update

from etl.models import change_events, connection_history, profile_history, sharing_text_history
from etl.records import (
    CONNECTION_FLAGS,
    PROFILE_FIELDS,
    Change,
    ChangeKind,
    Entity,
    EntityRow,
    Snapshot,
)

_TABLES: dict[Entity, Table] = {
    Entity.PROFILE: profile_history,
    Entity.CONNECTION: connection_history,
    Entity.SHARING_TEXT: sharing_text_history,
}
_KEY_COLUMN: dict[Entity, str | None] = {
    Entity.PROFILE: None,
    Entity.CONNECTION: "network",
    Entity.SHARING_TEXT: "action",
}
_VALUE_COLUMNS: dict[Entity, tuple[str, ...]] = {
    Entity.PROFILE: PROFILE_FIELDS,
    Entity.CONNECTION: CONNECTION_FLAGS,
    Entity.SHARING_TEXT: ("text",),
}


@dataclass(frozen=True, slots=True)
class StoredRow:
    """A current history row as stored: its id, and the row it holds."""

    id: int
    row: EntityRow


def load_current(connection: Connection, account_id: int) -> list[StoredRow]:
    """Every current (valid_to IS NULL) history row of one account."""
    rows: list[StoredRow] = []
    for entity, table in _TABLES.items():
        key_column = _KEY_COLUMN[entity]
        columns = [table.c.id, table.c.row_hash, *(table.c[c] for c in _VALUE_COLUMNS[entity])]
        if key_column:
            columns.append(table.c[key_column])
        query = select(*columns).where(table.c.account_id == account_id, table.c.valid_to.is_(None))
        for record in connection.execute(query).mappings():
            values = {name: record[name] for name in _VALUE_COLUMNS[entity]}
            key = record[key_column] if key_column else None
            rows.append(StoredRow(record["id"], EntityRow(entity, key, values, record["row_hash"])))
    return rows


def write_history(
    connection: Connection,
    *,
    account_id: int,
    run_id: int,
    as_of: datetime,
    current: Sequence[StoredRow],
    fetched: Snapshot,
    changes: Sequence[Change],
) -> None:
    """Close the rows that changed or vanished, insert their successors, record the changes.

    A closed row's valid_to is `as_of`, which is also its successor's valid_from: contiguous.
    """
    if not changes:
        return
    touched = {(change.entity, change.key) for change in changes}
    stored = {item.row.identity: item for item in current}
    _close(connection, as_of, [stored[i] for i in touched if i in stored])
    successors = [row for row in fetched.rows() if row.identity in touched]
    _insert_rows(connection, account_id, run_id, as_of, successors)
    _insert_events(connection, account_id, run_id, as_of, changes)


def _close(connection: Connection, as_of: datetime, rows: Iterable[StoredRow]) -> None:
    by_entity: dict[Entity, list[int]] = {}
    for item in rows:
        by_entity.setdefault(item.row.entity, []).append(item.id)
    for entity, ids in by_entity.items():
        table = _TABLES[entity]
        connection.execute(
            update(table)
            .where(table.c.id.in_(ids), table.c.valid_to.is_(None))
            .values(valid_to=as_of)
        )


def _insert_rows(
    connection: Connection,
    account_id: int,
    run_id: int,
    as_of: datetime,
    rows: Iterable[EntityRow],
) -> None:
    by_entity: dict[Entity, list[dict[str, Any]]] = {}
    for row in rows:
        record: dict[str, Any] = {
            "account_id": account_id,
            "run_id": run_id,
            "valid_from": as_of,
            "valid_to": None,
            "row_hash": row.digest,
            **row.values,
        }
        key_column = _KEY_COLUMN[row.entity]
        if key_column:
            record[key_column] = row.key
        by_entity.setdefault(row.entity, []).append(record)
    for entity, records in by_entity.items():
        connection.execute(insert(_TABLES[entity]), records)


def _insert_events(
    connection: Connection,
    account_id: int,
    run_id: int,
    as_of: datetime,
    changes: Iterable[Change],
) -> None:
    connection.execute(
        insert(change_events),
        [
            {
                "run_id": run_id,
                "account_id": account_id,
                "changed_at": as_of,
                "entity": str(change.entity),
                "entity_key": change.key,
                "field": change.field,
                "change": str(change.change),
                # JSON text; SQL NULL only for the side of a whole-row change that has no row
                "old_value": None if change.change is ChangeKind.ADDED else _json(change.old),
                "new_value": None if change.change is ChangeKind.REMOVED else _json(change.new),
            }
            for change in changes
        ],
    )


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)
