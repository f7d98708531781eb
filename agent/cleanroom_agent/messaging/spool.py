"""The durable outbox and the agent's small persistent state, in one SQLite file (``agent.db``).

Everything the agent sends goes through one ordered outbox: a row is signed when it is enqueued (its seq
allocated in the same transaction) and published strictly in seq order. The broker's PUBACK only marks it
sent (``sent_at``); it is deleted when the controller's signed watermark lists it as stored
(:meth:`Spool.covered`), so a message lost after the broker (a controller killed before its commit, a
broker that lost its queue) is still here to be sent again: all unlisted rows after a reconnect
(:meth:`Spool.resend_all`), and a row sent a while ago that a later stored seq shows was skipped
(:meth:`Spool.resend_gaps`). The controller recognises what it already has by (agent, seq) and digest.
WAL + ``synchronous=FULL`` so a committed row survives power loss.

The outbox is bounded (``max_rows``): when it is full, new events and acks are refused (the outbox
counts them) and rows already held are never dropped; :attr:`Spool.full` (a :class:`SpoolLevel`, with a
low-water mark) is what the agent fails closed on. Beyond the bound a small reserve (``reserve_rows``, 1 %
of it, at least 32) takes only evidence rows: the record of the agent ending sessions (``agent.fail_closed``,
``session.ended``, the acks of ``end_session``), so failing closed is never itself unrecorded.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cleanroom_protocol.datafiles import secure_database

from ..decisions import SpoolLevel

MAX_REMEMBERED_COMMANDS = 1000
# Command nonces are remembered until their command expires (at most MAX_COMMAND_LIFETIME_S, 1 h) and
# commands draw on a budget of 20/s, so this many cover far more than the controller ever sends; past it
# the soonest to expire are forgotten first (the seq check still refuses a replayed envelope).
MAX_REMEMBERED_NONCES = 10_000
# An endpoint cut off for days keeps its events, but not without limit: ~100,000 signed events is
# ~60 MB on disk. Past it new events are refused and counted (see Outbox.event), never silently lost, and
# the agent fails closed until watermarks drain it (the ``spool_max_rows`` setting).
MAX_OUTBOX_ROWS = 100_000


class SpoolFull(Exception):
    """The outbox holds ``max_rows`` rows (unsent, or sent and not yet listed by a watermark); only
    coalescing rows (posture, status) still fit, and evidence rows while the reserve has room."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    retain INTEGER NOT NULL,
    coalesce_key TEXT,
    sent_at REAL
);
CREATE INDEX IF NOT EXISTS outbox_coalesce ON outbox (coalesce_key);
CREATE TABLE IF NOT EXISTS counter (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS commands (id TEXT PRIMARY KEY, ack TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS nonces (nonce TEXT PRIMARY KEY, command_id TEXT NOT NULL, expires_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS nonces_expiry ON nonces (expires_at);
"""


@dataclass(frozen=True, slots=True)
class OutboxRow:
    seq: int
    topic: str
    payload: bytes
    retain: bool
    coalesce_key: str | None


class Spool:
    """Outbox + seq counter + key/value state. Thread-safe (one connection behind a lock)."""

    def __init__(self, path: Path, *, max_rows: int = MAX_OUTBOX_ROWS) -> None:
        self.max_rows = max_rows
        self._level = SpoolLevel(max_rows)
        self._level_listeners: list[Callable[[bool], None]] = []
        # Data dir 0700, agent.db and its -wal/-shm 0600, before SQLite opens (and creates) them.
        self.tightened = secure_database(path)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        if "sent_at" not in {r[1] for r in self._db.execute("PRAGMA table_info(outbox)")}:
            self._db.execute("ALTER TABLE outbox ADD COLUMN sent_at REAL")  # a spool from before watermarks
        # A fresh database starts its counter at the wall clock in ms rather than 1: if the file is ever lost
        # and recreated, seqs still rise above those the controller accepted before (gaps are fine).
        self._db.execute(
            "INSERT OR IGNORE INTO counter (name, value) VALUES ('seq', ?)", (int(time.time() * 1000),)
        )
        self._listeners: list[Callable[[], None]] = []
        self._rows = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        self._level.update(self._rows)  # a spool full at a restart is full from the start

    @property
    def full(self) -> bool:
        """Full: it reached ``max_rows`` and no watermark has drained it to its low-water mark since."""
        return self._level.full

    @property
    def low_rows(self) -> int:
        return self._level.low_rows

    @property
    def reserve_rows(self) -> int:
        """Rows beyond ``max_rows`` that only evidence may use."""
        return self._level.reserve_rows

    def on_level_change(self, listener: Callable[[bool], None]) -> None:
        """``listener(full)`` is called when the spool becomes full and when it has drained."""
        self._level_listeners.append(listener)

    def _count_changed(self, delta: int) -> bool:
        """Under the lock: ``delta`` rows came or went; ``True`` when that changed :attr:`full`."""
        self._rows += delta
        return self._level.update(self._rows)

    def _tell_level(self, changed: bool) -> None:
        """Outside the lock (a listener may read the spool)."""
        if changed:
            for listener in self._level_listeners:
                listener(self._level.full)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def on_enqueue(self, listener: Callable[[], None]) -> None:
        """``listener`` is called after every enqueue (the link wakes its publisher with it)."""
        self._listeners.append(listener)

    # seq ---------------------------------------------------------------------------------------------
    def next_seq(self) -> int:
        """Allocate the next seq durably (committed before it is used to sign)."""
        with self._lock:
            return self._allocate()

    def _allocate(self) -> int:
        row = self._db.execute(
            "UPDATE counter SET value = value + 1 WHERE name = 'seq' RETURNING value"
        ).fetchone()
        return int(row[0])

    # outbox ------------------------------------------------------------------------------------------
    def enqueue(
        self,
        topic: str,
        make_payload: Callable[[int], bytes],
        *,
        retain: bool = False,
        coalesce_key: str | None = None,
        evidence: bool = False,
    ) -> int:
        """Allocate a seq, sign with ``make_payload(seq)`` and store the row, in one transaction.

        With ``coalesce_key`` a newer row replaces older *unsent* rows of the same key (posture, status).
        Raises :class:`SpoolFull` for a non-coalescing row when ``max_rows`` rows wait, and for an
        ``evidence`` row when the reserve beyond them is used up too.
        """
        with self._lock:
            if coalesce_key is None and not self._level.admits(self._rows, evidence=evidence):
                bound = self.max_rows + (self.reserve_rows if evidence else 0)
                raise SpoolFull(
                    f"{self.path}: {self._rows} rows wait for the controller's watermark (bound {bound})"
                )
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seq = self._allocate()
                payload = make_payload(seq)
                replaced = 0
                if coalesce_key is not None:
                    replaced = self._db.execute(
                        "DELETE FROM outbox WHERE coalesce_key = ?", (coalesce_key,)
                    ).rowcount
                self._db.execute(
                    "INSERT INTO outbox (seq, topic, payload, retain, coalesce_key) VALUES (?, ?, ?, ?, ?)",
                    (seq, topic, payload, int(retain), coalesce_key),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            changed = self._count_changed(1 - replaced)
        self._tell_level(changed)
        for listener in self._listeners:
            listener()
        return seq

    def first(self) -> OutboxRow | None:
        """The unsent row with the lowest seq."""
        with self._lock:
            row = self._db.execute(
                """SELECT seq, topic, payload, retain, coalesce_key FROM outbox WHERE sent_at IS NULL
                   ORDER BY seq LIMIT 1"""
            ).fetchone()
        if row is None:
            return None
        return OutboxRow(int(row[0]), str(row[1]), bytes(row[2]), bool(row[3]), row[4])

    def pending(self) -> list[OutboxRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, topic, payload, retain, coalesce_key FROM outbox ORDER BY seq"
            ).fetchall()
        return [OutboxRow(int(r[0]), str(r[1]), bytes(r[2]), bool(r[3]), r[4]) for r in rows]

    def count(self) -> int:
        """Rows kept: unsent, and sent but not yet listed by a watermark."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def unsent(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox WHERE sent_at IS NULL").fetchone()[0])

    def mark_sent(self, seq: int, now: float) -> None:
        """The broker acknowledged ``seq``: kept until a watermark lists it, not published again unless
        it is found missing."""
        with self._lock:
            self._db.execute("UPDATE outbox SET sent_at = ? WHERE seq = ?", (now, seq))

    def covered(self, ranges: Iterable[tuple[int, int]]) -> int:
        """The controller stored these seqs (inclusive ranges of a verified watermark): they leave."""
        deleted = 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for first, last in ranges:
                    deleted += self._db.execute(
                        "DELETE FROM outbox WHERE seq BETWEEN ? AND ?", (first, last)
                    ).rowcount
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            changed = self._count_changed(-deleted)
        self._tell_level(changed)
        return deleted

    def resend_gaps(self, high: int, *, sent_before: float) -> int:
        """Rows sent before ``sent_before`` and still unlisted although the controller stored ``high``, a
        later seq: lost on the way (the broker delivers one sender's messages in order). Sent again."""
        with self._lock:
            return int(
                self._db.execute(
                    "UPDATE outbox SET sent_at = NULL WHERE sent_at < ? AND seq < ?", (sent_before, high)
                ).rowcount
            )

    def resend_all(self) -> int:
        """A new connection: every row no watermark listed goes out again (the controller de-duplicates)."""
        with self._lock:
            return int(
                self._db.execute("UPDATE outbox SET sent_at = NULL WHERE sent_at IS NOT NULL").rowcount
            )

    def delete(self, seq: int) -> None:
        """The broker acknowledged ``seq``: it leaves the outbox."""
        with self._lock:
            changed = self._count_changed(
                -self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,)).rowcount
            )
        self._tell_level(changed)

    # key/value state ---------------------------------------------------------------------------------
    def get_state(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_state(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO state (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def set_states(self, values: dict[str, str]) -> None:
        """Several keys in one transaction (one fsync): counters that must agree."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT INTO state (key, value) VALUES (?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    list(values.items()),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def get_int(self, key: str) -> int | None:
        value = self.get_state(key)
        return None if value is None else int(value)

    # processed commands (idempotency) ----------------------------------------------------------------
    def command_ack(self, command_id: str) -> dict[str, Any] | None:
        """The ack body already sent for ``command_id``, if it was processed."""
        with self._lock:
            row = self._db.execute("SELECT ack FROM commands WHERE id = ?", (command_id,)).fetchone()
        if row is None:
            return None
        value: dict[str, Any] = json.loads(row[0])
        return value

    def remember_command(self, command_id: str, ack: dict[str, Any]) -> None:
        """Record the ack of a processed command; keep only the newest ``MAX_REMEMBERED_COMMANDS``."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO commands (id, ack, at) VALUES (?, ?, ?)",
                (command_id, json.dumps(ack, sort_keys=True), time.time()),
            )
            self._db.execute(
                "DELETE FROM commands WHERE id NOT IN (SELECT id FROM commands ORDER BY at DESC LIMIT ?)",
                (MAX_REMEMBERED_COMMANDS,),
            )

    # command nonces (replay protection) ----------------------------------------------------------------
    def nonce_owner(self, nonce: str, now: float) -> str | None:
        """The id of the command that already used ``nonce`` and has not expired yet, if any."""
        with self._lock:
            row = self._db.execute(
                "SELECT command_id FROM nonces WHERE nonce = ? AND expires_at >= ?", (nonce, now)
            ).fetchone()
        return None if row is None else str(row[0])

    def remember_nonce(self, nonce: str, command_id: str, expires_at: float, now: float) -> None:
        """Keep ``nonce`` (used by ``command_id``) until ``expires_at``; forget the expired ones, and past
        ``MAX_REMEMBERED_NONCES`` the ones expiring soonest."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM nonces WHERE expires_at < ?", (now,))
                self._db.execute(
                    "INSERT OR IGNORE INTO nonces (nonce, command_id, expires_at) VALUES (?, ?, ?)",
                    (nonce, command_id, expires_at),
                )
                count = int(self._db.execute("SELECT COUNT(*) FROM nonces").fetchone()[0])
                if count > MAX_REMEMBERED_NONCES:
                    self._db.execute(
                        """DELETE FROM nonces WHERE nonce IN
                           (SELECT nonce FROM nonces ORDER BY expires_at LIMIT ?)""",
                        (count - MAX_REMEMBERED_NONCES,),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
