"""The SCD type 2 history writer: current rows in, closed and new rows and change events out.

Explicit on purpose (no ORM flush hooks): `write_history` takes, for a batch of accounts, their
current rows, the fetched snapshots, the changes between them and the run's `as_of`, and issues
the statements, a few per batch rather than per account. The caller owns the transaction, so each
account's rows commit together or not at all.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Table, select, update

from etl.bulk import insert_rows
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


@dataclass(frozen=True, slots=True)
class AccountChanges:
    """One account's part of a batch: its stored current rows, what was fetched, the diff."""

    account_id: int
    current: Sequence[StoredRow]
    fetched: Snapshot
    changes: Sequence[Change]


def load_current(
    connection: Connection, account_ids: Sequence[int]
) -> dict[int, list[StoredRow]]:
    """Every current (valid_to IS NULL) history row of these accounts: three queries in all."""
    rows: dict[int, list[StoredRow]] = {account_id: [] for account_id in account_ids}
    if not account_ids:
        return rows
    for entity, table in _TABLES.items():
        key_column = _KEY_COLUMN[entity]
        names = _VALUE_COLUMNS[entity]
        columns = [table.c.account_id, table.c.id, table.c.row_hash, *(table.c[c] for c in names)]
        if key_column:
            columns.append(table.c[key_column])
        query = select(*columns).where(
            table.c.account_id.in_(list(account_ids)), table.c.valid_to.is_(None)
        )
        for record in connection.execute(query):
            values = {name: record._mapping[name] for name in names}
            key = record._mapping[key_column] if key_column else None
            stored = StoredRow(record.id, EntityRow(entity, key, values, record.row_hash))
            rows[record.account_id].append(stored)
    return rows


def write_history(
    connection: Connection,
    *,
    run_id: int,
    as_of: datetime,
    accounts: Sequence[AccountChanges],
) -> None:
    """Close the rows that changed or vanished, insert their successors, record the changes:
    for a whole batch of accounts, one statement per table and kind.

    A closed row's valid_to is `as_of`, which is also its successor's valid_from: contiguous.
    Closes go first, so the one-current-row index never sees two current rows.
    """
    closing: list[StoredRow] = []
    successors: list[tuple[int, EntityRow]] = []
    events: list[tuple[int, Change]] = []
    for account in accounts:
        if not account.changes:
            continue
        touched = {(change.entity, change.key) for change in account.changes}
        closing += [item for item in account.current if item.row.identity in touched]
        successors += [
            (account.account_id, row) for row in account.fetched.rows() if row.identity in touched
        ]
        events += [(account.account_id, change) for change in account.changes]
    _close(connection, as_of, closing)
    _insert_rows(connection, run_id, as_of, successors)
    _insert_events(connection, run_id, as_of, events)


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
    run_id: int,
    as_of: datetime,
    rows: Iterable[tuple[int, EntityRow]],
) -> None:
    by_entity: dict[Entity, list[dict[str, Any]]] = {}
    for account_id, row in rows:
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
        insert_rows(connection, _TABLES[entity], records)


def _insert_events(
    connection: Connection,
    run_id: int,
    as_of: datetime,
    changes: Sequence[tuple[int, Change]],
) -> None:
    insert_rows(
        connection,
        change_events,
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
            for account_id, change in changes
        ],
    )


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)
