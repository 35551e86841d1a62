"""Inserting many rows at once, the cheapest way each database offers.

A Core `connection.execute(insert(table), rows)` processes every parameter set in Python before
the driver sees it; for the batches a sync writes, that cost more than the rest of writing.

- PostgreSQL with psycopg: COPY ... FROM STDIN, in the current transaction. psycopg runs an
  executemany as a pipeline with Python work per row; COPY formats the rows in C.
- SQLite and MariaDB: one executemany of plain tuples through `exec_driver_sql`, each value
  passed through its column type's own bind processor (so stored values are exactly what
  SQLAlchemy would store and read back), with timestamps converted once per distinct value.

Constraints and indexes apply as to any INSERT, and a row the database refuses (a NUL in
PostgreSQL text) fails the statement, raised as SQLAlchemy's `DBAPIError` like any other.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, Connection, Table
from sqlalchemy.exc import DBAPIError

from etl.models import UTCDateTime

Processor = Callable[[Any], Any]


def insert_rows(connection: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """Insert `rows` (dicts with the same keys) into `table`, in the caller's transaction."""
    if not rows:
        return
    if connection.dialect.name == "postgresql" and connection.dialect.driver == "psycopg":
        _copy(connection, table, rows)
    else:
        _executemany(connection, table, rows)


def _copy(connection: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    columns = list(rows[0])
    utc = [name for name in columns if isinstance(table.c[name].type, UTCDateTime)]
    quote = connection.dialect.identifier_preparer.quote
    statement = f"COPY {quote(table.name)} ({', '.join(map(quote, columns))}) FROM STDIN"
    errors = connection.dialect.loaded_dbapi.Error
    driver = connection.connection.driver_connection
    assert driver is not None
    try:
        with driver.cursor() as cursor, cursor.copy(statement) as copy:
            for row in rows:
                for name in utc:  # what UTCDateTime enforces on the INSERT path
                    _check_aware(table, name, row[name])
                copy.write_row([row[name] for name in columns])
    except errors as exc:
        # As SQLAlchemy would have raised it: callers tell refused data from a lost database.
        raise DBAPIError.instance(statement, None, exc, errors) from exc


def _executemany(connection: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    dialect = connection.dialect
    columns = list(rows[0])
    processed = [
        (index, process)
        for index, name in enumerate(columns)
        if (process := _processor(table, name, dialect)) is not None
    ]
    quote = dialect.identifier_preparer.quote
    marker = "?" if dialect.paramstyle == "qmark" else "%s"
    statement = (
        f"INSERT INTO {quote(table.name)} ({', '.join(map(quote, columns))}) "
        f"VALUES ({', '.join([marker] * len(columns))})"
    )
    values = operator.itemgetter(*columns)
    if len(columns) == 1:
        tuples: list[Any] = [(values(row),) for row in rows]
    else:
        tuples = [values(row) for row in rows]
    if processed:
        for number, record in enumerate(tuples):
            changed = list(record)
            for index, process in processed:
                changed[index] = process(changed[index])
            tuples[number] = tuple(changed)
    connection.exec_driver_sql(statement, tuples)


def _processor(table: Table, name: str, dialect: Any) -> Processor | None:
    column_type = table.c[name].type
    if isinstance(column_type, Boolean):
        return None  # sqlite3 and PyMySQL take Python booleans as 1 and 0, as SQLAlchemy would
    process: Processor | None = column_type.bind_processor(dialect)
    if process is None or not isinstance(column_type, UTCDateTime):
        return process
    return _remembering(process)


def _remembering(process: Processor) -> Processor:
    """A timestamp processor that converts each distinct value once (a batch's rows share the
    run's `as_of`)."""
    seen: dict[datetime, Any] = {}

    def convert(value: Any) -> Any:
        if value is None:
            return None
        found = seen.get(value)
        if found is None:
            found = seen[value] = process(value)
        return found

    return convert


def _check_aware(table: Table, name: str, value: Any) -> None:
    if isinstance(value, datetime) and value.tzinfo is None:
        raise ValueError(f"naive datetime given to a UTC column ({table.name}.{name})")
