"""The controller's store: ``Store`` (store.py) with every SQL statement, the database URL (pure), the small
backend interface the store runs over, and its two real implementations, SQLite (embedded, the default) and
PostgreSQL (N controllers).

``Store`` keeps every SQL statement; a backend supplies the connection, the placeholder style,
the write lock of a transaction and the dialect's DDL. ``open_backend`` imports psycopg only for a
``postgresql://`` URL, so the CLI on SQLite never pays for it.
"""

from __future__ import annotations

from .backend import Backend, Cursor, DatabaseUnavailable, Row, open_backend
from .store import AgentExistsError, Store
from .url import DB_NAME, DatabaseUrl, DatabaseUrlError, parse_database_url, redact_url

__all__ = [
    "DB_NAME",
    "AgentExistsError",
    "Backend",
    "Cursor",
    "DatabaseUnavailable",
    "DatabaseUrl",
    "DatabaseUrlError",
    "Row",
    "Store",
    "open_backend",
    "parse_database_url",
    "redact_url",
]
