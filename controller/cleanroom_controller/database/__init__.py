"""Where the controller's store lives: the database URL (pure), the small backend interface the store runs
over, and its two real implementations, SQLite (embedded, the default) and PostgreSQL (N controllers).

``Store`` (store.py) keeps every SQL statement; a backend supplies the connection, the placeholder style,
the write lock of a transaction and the dialect's DDL. ``open_backend`` imports psycopg only for a
``postgresql://`` URL, so the CLI on SQLite never pays for it.
"""

from __future__ import annotations

from pathlib import Path

from .backend import Backend, Cursor, Row
from .url import DB_NAME, DatabaseUrl, DatabaseUrlError, parse_database_url, redact_url

__all__ = [
    "DB_NAME",
    "Backend",
    "Cursor",
    "DatabaseUrl",
    "DatabaseUrlError",
    "Row",
    "open_backend",
    "parse_database_url",
    "redact_url",
]


def open_backend(url: DatabaseUrl) -> Backend:
    """Connect to the database ``url`` names (the SQLite file is created if missing)."""
    if url.dialect == "postgresql":
        from .postgres import PostgresBackend

        return PostgresBackend(url.dsn)
    from .sqlite import SqliteBackend

    assert url.path is not None  # a sqlite URL always has one (parse_database_url)
    return SqliteBackend(Path(url.path))
