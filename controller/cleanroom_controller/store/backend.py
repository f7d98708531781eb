"""The interface the store runs over: one connection, its placeholder style, the write lock and the DDL.

SQL handed to :meth:`Backend.execute` is written once, in the portable subset both dialects run: ``?``
placeholders (a backend with another style translates them), ``INSERT ... ON CONFLICT (...) DO UPDATE|NOTHING``,
``RETURNING``, ``SAVEPOINT``; no ``INSERT OR``, ``rowid``, ``json_each`` or two-argument ``MAX``. DDL is written
in SQLite's spelling (``INTEGER``, ``INTEGER PRIMARY KEY`` for a generated id, ``REAL``, ``TEXT``, ``BLOB``) and
translated by the backend; what cannot be shared (triggers) is given once per dialect.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from .url import DatabaseUrl


class DatabaseUnavailable(Exception):
    """The database cannot be reached now: the connection was lost (a server restart, a network cut) or
    connecting again failed. Nothing the transaction in hand wrote is committed (a connection lost *during*
    ``COMMIT`` leaves its outcome unknown: retrying it is safe, since ingest recognises what was stored by
    (agent, seq, digest)). Callers treat it like any failed commit: undo what they counted in memory, keep
    what they hold (unacknowledged), and try again later; the backend reconnects by itself, with jittered
    backoff, at the next statement after the wait."""


class Row(Protocol):
    """One result row: by position and by column name (``sqlite3.Row`` is one)."""

    def __getitem__(self, key: int | str, /) -> Any: ...
    def __len__(self) -> int: ...


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class Backend(Protocol):
    dialect: Literal["sqlite", "postgresql"]
    # What errors and logs may name: the SQLite file, or the PostgreSQL URL without its password.
    location: str
    # A column list that orders rows as inserted (ties of ``received`` within a batch).
    insertion_order: str
    # How many times the connection was lost and made again (always 0 on SQLite: a file is not lost).
    reconnects: int

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        """Run one statement; outside a transaction it commits by itself. Raises :class:`DatabaseUnavailable`
        when the connection is lost (or cannot be made again yet)."""
        ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """Run one statement once per parameter row (one round trip where the driver can)."""
        ...

    def stream(self, sql: str, params: Sequence[Any] = (), chunk: int = 1000) -> Iterator[tuple[Any, ...]]:
        """Rows as plain tuples, fetched ``chunk`` at a time: constant memory over millions of rows."""
        ...

    @property
    def in_transaction(self) -> bool: ...

    def begin_write(self) -> None:
        """Open a write transaction holding the database's one writer lock until commit or rollback: SQLite's
        ``BEGIN IMMEDIATE``; on PostgreSQL ``BEGIN`` + ``pg_advisory_xact_lock`` (every controller of the
        group waits for it), so whatever a transaction reads (the audit chain's tip, an endpoint's last seq)
        nobody else changes before it commits."""
        ...

    def begin_read(self) -> None:
        """Open a read transaction that sees one snapshot throughout (SQLite's deferred ``BEGIN`` under WAL;
        ``REPEATABLE READ, READ ONLY`` on PostgreSQL), while others keep writing."""
        ...

    def commit(self) -> None: ...
    def rollback(self) -> None: ...

    def create_schema(self, schema: str, extra: Mapping[str, str]) -> None:
        """Create what is missing of ``schema`` (SQLite spelling), then run ``extra[dialect]`` (what cannot be
        shared: PostgreSQL's triggers); safe when several controllers start at once."""
        ...

    def add_column(self, table: str, column: str, decl: str) -> None:
        """Add ``column`` (declared in SQLite spelling) to ``table`` unless it has it (older databases)."""
        ...

    def close(self) -> None: ...


def open_backend(url: DatabaseUrl) -> Backend:
    """Connect to the database ``url`` names (the SQLite file is created if missing)."""
    if url.dialect == "postgresql":
        from .postgres import PostgresBackend

        return PostgresBackend(url.dsn)
    from .sqlite import SqliteBackend

    assert url.path is not None  # a sqlite URL always has one (parse_database_url)
    return SqliteBackend(Path(url.path))
