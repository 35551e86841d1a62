"""Alembic migrations of trakt-etl (installed as `etl.migrations`)."""
