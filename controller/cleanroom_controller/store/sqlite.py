"""The embedded default: one SQLite file (WAL) in the controller's data dir; ``BEGIN IMMEDIATE`` is the
write lock. Nothing to install or run beside the controller."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from cleanroom_protocol.datafiles import secure_database

# How long a statement waits for another writer's lock before "database is locked" (then ingest keeps the
# batch, unacknowledged, and tries again: daemon COMMIT_RETRY_S).
BUSY_TIMEOUT_S = 30.0


class SqliteBackend:
    dialect: Literal["sqlite", "postgresql"] = "sqlite"
    insertion_order = "rowid"
    # A file is never "lost": a locked database or a full disk fails the statement, and the caller retries
    # (ingest: the batch kept in hand, docs/data-path.md).
    reconnects = 0

    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = str(path)
        # Data dir 0700, the database and its -wal/-shm 0600, before SQLite opens (and creates) them.
        self.tightened = secure_database(path)
        self._db = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_S)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk when COMMIT returns. Ingest acknowledges a message to the broker only
        # after its commit (docs/data-path.md); with NORMAL a power cut could still lose the last commits.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")

    @property
    def connection(self) -> sqlite3.Connection:
        return self._db

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self._db.execute(sql, params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._db.executemany(sql, rows)

    def stream(self, sql: str, params: Sequence[Any] = (), chunk: int = 1000) -> Iterator[tuple[Any, ...]]:
        cur = self._db.cursor()
        cur.row_factory = None  # plain tuples
        cur.arraysize = chunk
        cur.execute(sql, params)
        while rows := cur.fetchmany():
            yield from rows

    @property
    def in_transaction(self) -> bool:
        return self._db.in_transaction

    def begin_write(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def begin_read(self) -> None:
        self._db.execute("BEGIN")

    def commit(self) -> None:
        self._db.execute("COMMIT")

    def rollback(self) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def create_schema(self, schema: str, extra: Mapping[str, str]) -> None:
        self._db.executescript(schema + extra.get(self.dialect, ""))

    def add_column(self, table: str, column: str, decl: str) -> None:
        have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")

    def close(self) -> None:
        self._db.close()
