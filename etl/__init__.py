"""trakt-etl: a SQL copy of trakt.tv account settings, with full history and diffs."""

__version__ = "0.1.0"
