"""The controller's state: enrolled agents, endpoints, sessions, events, decisions, commands, reject counts,
the audit chain and a few durable counters, in SQLite (WAL, the embedded default) or PostgreSQL (N controllers).

Every SQL statement lives here in :class:`Store`, written once in the portable subset both dialects run (see
``database/backend.py``: ``?`` placeholders, ``ON CONFLICT``, ``RETURNING``; DDL in SQLite's spelling, translated
for PostgreSQL; what cannot be shared, such as triggers, once per dialect); the backend (``database/sqlite.py``,
``database/postgres.py``) brings the connection and the write lock. Several writers share one database (the
daemon, CLI commands such as ``agents add``, the other controllers of a share group), so every write
transaction holds the database's one writer lock (``BEGIN IMMEDIATE`` / ``pg_advisory_xact_lock``) and every
audit append reads the chain tip inside it instead of trusting a cached one: the chain stays one order whoever
writes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..audit import GENESIS_HEAD, AuditEntry, ChainHead, make_entry
from ..desktops.machine import Desktop, DesktopState
from ..models import CommandRecord, CommandState, Condition, EndpointState, SessionRecord, SessionState
from ..trust.enrolment import TokenRecord
from .backend import Backend, Row, open_backend
from .url import DB_NAME, DatabaseUrl, parse_database_url

_PREFETCH_CHUNK = 500  # agents per prefetch query (well inside SQLite's and PostgreSQL's parameter limits)

__all__ = ["DB_NAME", "POSTGRES_DDL", "SCHEMA", "AgentExistsError", "Store"]

# SQLite's spelling (INTEGER, REAL, TEXT, BLOB; INTEGER PRIMARY KEY = a generated id), translated for PostgreSQL
# by database/postgres.py, which leaves SQLite's CREATE TRIGGER statements out: their PostgreSQL versions are in
# POSTGRES_DDL. Quote reserved words ("user").
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS agents (
    id TEXT PRIMARY KEY, public_key TEXT NOT NULL, fingerprint TEXT NOT NULL, enrolled_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS endpoints (
    agent TEXT PRIMARY KEY, condition TEXT NOT NULL DEFAULT 'unknown', online INTEGER, compliant INTEGER,
    reasons TEXT NOT NULL DEFAULT '[]', last_seen REAL, last_seq INTEGER, will_seq INTEGER, mode TEXT,
    policy TEXT, posture TEXT, updated REAL
);
CREATE TABLE IF NOT EXISTS rejects (
    sender TEXT NOT NULL, status TEXT NOT NULL, count INTEGER NOT NULL, last_at REAL NOT NULL,
    PRIMARY KEY (sender, status)
);
-- batch: the id of the audit entry (verdict.batch) whose Merkle root covers the message, leaf: its index there;
-- NULL until sealed (within audit seal_s of being stored). audit/sealer.py, docs/audit.md.
-- ts: the envelope's (when the agent signed it); late_s: how late it came when outside the freshness window
-- (negative: ahead of our clock), NULL when fresh; each batch entry sums these up (late, max_late_s, ahead).
CREATE TABLE IF NOT EXISTS messages (
    agent TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, digest TEXT NOT NULL, received REAL NOT NULL,
    batch INTEGER, leaf INTEGER, ts REAL, late_s REAL, PRIMARY KEY (agent, seq)
);
CREATE TABLE IF NOT EXISTS events (
    agent TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, ts REAL NOT NULL, at REAL NOT NULL,
    severity TEXT NOT NULL, blocked INTEGER NOT NULL, details TEXT NOT NULL, received REAL NOT NULL,
    UNIQUE (agent, seq)
);
CREATE TABLE IF NOT EXISTS sessions (
    agent TEXT NOT NULL, id TEXT NOT NULL, state TEXT NOT NULL, client TEXT NOT NULL DEFAULT '', pid INTEGER,
    "user" TEXT, started REAL, ended_reason TEXT, ending_reason TEXT, command_id TEXT, command_result TEXT,
    command_condition TEXT, updated REAL NOT NULL, PRIMARY KEY (agent, id)
);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY, agent TEXT NOT NULL, ts REAL NOT NULL, condition TEXT NOT NULL,
    reasons TEXT NOT NULL, actions TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY, agent TEXT NOT NULL, session_id TEXT, action TEXT NOT NULL, reason TEXT NOT NULL,
    state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, last_sent REAL,
    result TEXT, detail TEXT NOT NULL DEFAULT '', sessions TEXT NOT NULL DEFAULT '[]',
    nonce TEXT NOT NULL DEFAULT '', expires_at REAL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY, ts REAL NOT NULL, kind TEXT NOT NULL, actor TEXT NOT NULL, subject TEXT NOT NULL,
    data TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL
);
-- Append-only against accidents; a determined attacker can drop these, which the hash chain then shows.
-- The one delete allowed is `audit archive`'s: entries up to the archived base (meta audit_base_id, set in
-- the same transaction, after the segment was written to its archive file).
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;
CREATE TABLE IF NOT EXISTS enrolment_tokens (
    id TEXT PRIMARY KEY, secret_sha256 TEXT NOT NULL, site TEXT NOT NULL, created_at REAL NOT NULL,
    expires_at REAL NOT NULL, uses_allowed INTEGER NOT NULL, uses INTEGER NOT NULL DEFAULT 0, revoked_at REAL,
    created_by TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS agent_revocations (
    agent TEXT PRIMARY KEY, revoked_at REAL NOT NULL, reason TEXT NOT NULL, operator TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_received ON events (received);
CREATE INDEX IF NOT EXISTS messages_received ON messages (received);
CREATE INDEX IF NOT EXISTS commands_state ON commands (state);
-- Per-message reads of one agent's open sessions and pending commands, independent of its history.
CREATE INDEX IF NOT EXISTS sessions_agent_state ON sessions (agent, state);
CREATE INDEX IF NOT EXISTS commands_agent_state ON commands (agent, state);
-- Reject windows being counted (rejects.py), persisted with each batch; a crashed process's are audited later.
CREATE TABLE IF NOT EXISTS reject_windows (
    owner TEXT NOT NULL, sender TEXT NOT NULL, opened REAL NOT NULL, updated REAL NOT NULL, summary TEXT NOT NULL,
    PRIMARY KEY (owner, sender)
);
-- Non-persistent desktops (desktops/machine.py) and which session had which desktop, when (desktops/).
CREATE TABLE IF NOT EXISTS desktops (
    id TEXT PRIMARY KEY, pool TEXT NOT NULL, state TEXT NOT NULL, agent TEXT, session_id TEXT, user_name TEXT,
    reason TEXT NOT NULL DEFAULT '', attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL, last_wiped REAL,
    detail TEXT NOT NULL DEFAULT '', updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS desktops_session ON desktops (agent, session_id);
CREATE TABLE IF NOT EXISTS desktop_sessions (
    desktop TEXT NOT NULL, agent TEXT NOT NULL, session_id TEXT NOT NULL, user_name TEXT, address TEXT,
    started REAL NOT NULL, ended REAL, PRIMARY KEY (desktop, agent, session_id)
);
-- Which controller process drives a desktop's step now (N controllers on one store: never two at once); the
-- lease is renewed while it drives and lets another take over once a dead owner's lapses (desktops/runner.py).
CREATE TABLE IF NOT EXISTS desktop_claims (
    desktop TEXT PRIMARY KEY, owner TEXT NOT NULL, lease_until REAL NOT NULL, claimed REAL NOT NULL
);
"""

# What PostgreSQL needs beyond the translated SCHEMA: the audit table's append-only guards (SQLite's triggers
# above). A DELETE is let through only up to an archived base (meta audit_base_id), as on SQLite.
POSTGRES_DDL = """
CREATE OR REPLACE FUNCTION cleanroom_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND OLD.id <= COALESCE(
            (SELECT CAST(value AS BIGINT) FROM meta WHERE key = 'audit_base_id'), 0) THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'audit is append-only';
END $$;
CREATE OR REPLACE TRIGGER audit_no_change BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION cleanroom_audit_append_only();
CREATE OR REPLACE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
    FOR EACH STATEMENT EXECUTE FUNCTION cleanroom_audit_append_only();
"""


class AgentExistsError(Exception):
    """``agents add`` for an id already enrolled with another key."""


def _b(value: Any) -> bool | None:
    return None if value is None else bool(value)


def _token(r: Row) -> TokenRecord:
    return TokenRecord(
        id=r["id"],
        secret_sha256=r["secret_sha256"],
        site=r["site"],
        created_at=r["created_at"],
        expires_at=r["expires_at"],
        uses_allowed=r["uses_allowed"],
        uses=r["uses"],
        revoked_at=r["revoked_at"],
        created_by=r["created_by"],
    )


class Store:
    def __init__(self, target: Path | Backend) -> None:
        """``target``: a SQLite file, or a connected backend (:meth:`open` chooses from the settings)."""
        self._db: Backend = (
            open_backend(DatabaseUrl("sqlite", path=target)) if isinstance(target, Path) else target
        )
        self.dialect = self._db.dialect
        self.location = self._db.location  # for messages: the file, or the URL without its password
        self._db.create_schema(SCHEMA, {"postgresql": POSTGRES_DDL})
        self._add_missing_columns()
        self._tip: tuple[int, str] | None = None  # audit chain tip, cached inside one transaction
        self._head_dirty = False
        # Endpoints read or written inside the current write transaction (None outside one): it holds the
        # database's one writer lock, so nobody else changes them before it ends; a batch that names an
        # agent many times reads its row once (prefetch_endpoints: once for the whole batch).
        self._endpoint_cache: dict[str, EndpointState] | None = None

    def _add_missing_columns(self) -> None:
        """Columns added since a table was first created (CREATE TABLE IF NOT EXISTS keeps the old one)."""
        for column, decl in (("nonce", "TEXT NOT NULL DEFAULT ''"), ("expires_at", "REAL")):
            self._db.add_column("commands", column, decl)
        for column in ("batch", "leaf"):
            self._db.add_column("messages", column, "INTEGER")
        for column in ("ts", "late_s"):
            self._db.add_column("messages", column, "REAL")
        self._audit_schema()

    def _audit_schema(self) -> None:
        """The batch index (proofs read a batch's leaves; sealing reads the unsealed, batch NULL) and the
        archive-only delete trigger, replacing the unconditional one of older databases."""
        self._db.execute("CREATE INDEX IF NOT EXISTS messages_batch ON messages (batch, leaf)")
        if self.dialect != "sqlite":
            return  # PostgreSQL's archive-aware guard is in POSTGRES_DDL
        row = self._db.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = 'audit_no_delete'"
        ).fetchone()
        if row is not None and "audit_base_id" in str(row[0]):
            return
        self._db.execute("DROP TRIGGER IF EXISTS audit_no_delete")
        self._db.execute(
            "CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit WHEN OLD.id > COALESCE("
            "(SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'audit_base_id'), 0) "
            "BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END"
        )

    @classmethod
    def open(cls, data_dir: Path, database: str | None = None) -> Store:
        """The store ``database`` names (``database/url.py``); none: SQLite in ``data_dir``."""
        return cls(open_backend(parse_database_url(database, data_dir)))

    @property
    def path(self) -> Path:
        """The SQLite file (for tools that open it themselves); a PostgreSQL store has none."""
        path = getattr(self._db, "path", None)
        if not isinstance(path, Path):
            raise AttributeError(f"a {self.dialect} store has no file path")
        return path

    @property
    def tightened(self) -> object:
        """What opening the SQLite file tightened (modes); None on PostgreSQL."""
        return getattr(self._db, "tightened", None)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[Backend]:
        """One write transaction; nested use joins the outer one (ingest applies a whole batch in one).

        Inside it the audit chain tip is cached (the transaction holds the database's one writer lock, so
        nobody else, in this process or another controller, can append meanwhile) and the head record is
        written once, just before ``COMMIT``."""
        if self._db.in_transaction:
            yield self._db
            return
        self._db.begin_write()
        self._tip = None
        self._head_dirty = False
        self._endpoint_cache = {}
        try:
            yield self._db
            if self._head_dirty:
                self._write_head()
            self._db.commit()
        except BaseException:
            self._db.rollback()
            raise
        finally:
            self._tip = None
            self._head_dirty = False
            self._endpoint_cache = None

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """A unit inside the current transaction that rolls back alone (one message of a batch)."""
        self._db.execute("SAVEPOINT unit")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK TO SAVEPOINT unit")
            self._db.execute("RELEASE SAVEPOINT unit")
            self._tip = None  # entries appended in the unit are gone: re-read the tip
            if self._endpoint_cache is not None:
                self._endpoint_cache = {}  # and so are the endpoints it saved
            raise
        self._db.execute("RELEASE SAVEPOINT unit")

    # -- meta and counters -------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def next_seq(self) -> int:
        """The controller's next outgoing seq: allocated (and durable) before anything is signed with it."""
        with self.transaction() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()
            seq = int(row[0]) + 1 if row else 1
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('seq', ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(seq),),
            )
        return seq

    # -- agents --------------------------------------------------------------------------------------------
    def add_agent(self, agent: str, public_key_pem: str, fp: str, now: float) -> bool:
        """Enrol ``agent``; ``False`` if already enrolled with this key; raise if with another one."""
        with self.transaction() as db:
            row = db.execute("SELECT public_key FROM agents WHERE id = ?", (agent,)).fetchone()
            if row is not None:
                if row[0].strip() == public_key_pem.strip():
                    return False
                raise AgentExistsError(f"agent {agent!r} is already enrolled with another key")
            db.execute(
                "INSERT INTO agents (id, public_key, fingerprint, enrolled_at) VALUES (?, ?, ?, ?)",
                (agent, public_key_pem, fp, now),
            )
            db.execute(
                "INSERT INTO endpoints (agent, updated) VALUES (?, ?) ON CONFLICT (agent) DO NOTHING",
                (agent, now),
            )
        return True

    # -- enrolment tokens and revocations ------------------------------------------------------------------
    def add_token(self, t: TokenRecord) -> None:
        self._db.execute(
            "INSERT INTO enrolment_tokens (id, secret_sha256, site, created_at, expires_at, uses_allowed, uses,"
            " revoked_at, created_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (t.id, t.secret_sha256, t.site, t.created_at, t.expires_at, t.uses_allowed, t.uses, t.revoked_at,
             t.created_by),
        )  # fmt: skip

    def token(self, token_id: str) -> TokenRecord | None:
        r = self._db.execute("SELECT * FROM enrolment_tokens WHERE id = ?", (token_id,)).fetchone()
        return None if r is None else _token(r)

    def tokens(self) -> list[TokenRecord]:
        rows = self._db.execute("SELECT * FROM enrolment_tokens ORDER BY created_at DESC").fetchall()
        return [_token(r) for r in rows]

    def use_token(self, token_id: str, now: float) -> bool:
        """Count one use, atomically: False when the token is revoked, expired or used up meanwhile (two
        enrolments racing on a single-use token: exactly one wins)."""
        cur = self._db.execute(
            "UPDATE enrolment_tokens SET uses = uses + 1 WHERE id = ? AND revoked_at IS NULL AND expires_at > ?"
            " AND uses < uses_allowed",
            (token_id, now),
        )
        return cur.rowcount == 1

    def revoke_token(self, token_id: str, now: float) -> bool:
        cur = self._db.execute(
            "UPDATE enrolment_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (now, token_id)
        )
        return cur.rowcount == 1

    def revoke_agent(self, agent: str, reason: str, operator: str, now: float) -> bool:
        cur = self._db.execute(
            "INSERT INTO agent_revocations (agent, revoked_at, reason, operator) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (agent) DO NOTHING",
            (agent, now, reason, operator),
        )
        return cur.rowcount == 1

    def revoked_agents(self) -> dict[str, float]:
        rows = self._db.execute("SELECT agent, revoked_at FROM agent_revocations").fetchall()
        return {str(r["agent"]): float(r["revoked_at"]) for r in rows}

    def public_key_pem(self, agent: str) -> str | None:
        """The agent's enrolled signing key; None for an unknown or a revoked agent (its key counts for
        nothing any more)."""
        row = self._db.execute(
            "SELECT public_key FROM agents WHERE id = ? AND id NOT IN (SELECT agent FROM agent_revocations)",
            (agent,),
        ).fetchone()
        return None if row is None else str(row[0])

    def agent_fingerprints(self) -> dict[str, str]:
        return {r[0]: r[1] for r in self._db.execute("SELECT id, fingerprint FROM agents")}

    # -- endpoints -----------------------------------------------------------------------------------------
    def endpoint(self, agent: str) -> EndpointState:
        cache = self._endpoint_cache
        if cache is not None and agent in cache:
            return cache[agent]
        row = self._db.execute("SELECT * FROM endpoints WHERE agent = ?", (agent,)).fetchone()
        ep = EndpointState(agent) if row is None else self._endpoint(row)
        if cache is not None:
            cache[agent] = ep
        return ep

    def prefetch_endpoints(self, agents: Iterable[str]) -> None:
        """Inside a write transaction: read the endpoints of ``agents`` in one query (an ingest batch's
        senders: one round trip instead of one per message); :meth:`endpoint` then answers from memory."""
        cache = self._endpoint_cache
        if cache is None:
            return
        wanted = sorted(set(agents) - cache.keys())
        for i in range(0, len(wanted), _PREFETCH_CHUNK):
            chunk = wanted[i : i + _PREFETCH_CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(f"SELECT * FROM endpoints WHERE agent IN ({marks})", chunk)  # noqa: S608
            found = {ep.agent: ep for ep in map(self._endpoint, rows)}
            for agent in chunk:
                cache[agent] = found.get(agent) or EndpointState(agent)

    def endpoints(self) -> list[EndpointState]:
        rows = self._db.execute(
            "SELECT e.* FROM endpoints e JOIN agents a ON a.id = e.agent ORDER BY e.agent"
        ).fetchall()
        return [self._endpoint(r) for r in rows]

    def latest_postures(self) -> dict[str, dict[str, Any]]:
        """The last posture body each endpoint reported (as the ingest verified and stored it), by agent;
        endpoints that never sent one are absent. For the views: the endpoint's own state, such as its spool."""
        rows = self._db.execute("SELECT agent, posture FROM endpoints WHERE posture IS NOT NULL").fetchall()
        return {str(r[0]): json.loads(r[1]) for r in rows}

    @staticmethod
    def _endpoint(r: Row) -> EndpointState:
        return EndpointState(
            agent=r["agent"],
            condition=Condition(r["condition"]),
            online=_b(r["online"]),
            compliant=_b(r["compliant"]),
            reasons=tuple(json.loads(r["reasons"])),
            last_seen=r["last_seen"],
            last_seq=r["last_seq"],
            will_seq=r["will_seq"],
            mode=r["mode"],
            policy=r["policy"],
        )

    def save_endpoint(self, ep: EndpointState, *, posture: str | None = None) -> None:
        """``posture``: the last posture body as JSON text (stored as given; ``None`` keeps the stored one)."""
        self._db.execute(
            """INSERT INTO endpoints (agent, condition, online, compliant, reasons, last_seen, last_seq, will_seq,
                   mode, policy, posture, updated) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)
               ON CONFLICT (agent) DO UPDATE SET condition=excluded.condition, online=excluded.online,
                   compliant=excluded.compliant, reasons=excluded.reasons, last_seen=excluded.last_seen,
                   last_seq=excluded.last_seq, will_seq=excluded.will_seq, mode=excluded.mode,
                   policy=excluded.policy, posture=COALESCE(excluded.posture, endpoints.posture),
                   updated=excluded.updated""",
            (
                ep.agent,
                ep.condition.value,
                ep.online,
                ep.compliant,
                json.dumps(list(ep.reasons)),
                ep.last_seen,
                ep.last_seq,
                ep.will_seq,
                ep.mode,
                ep.policy,
                posture,
                time.time(),
            ),
        )
        if self._endpoint_cache is not None:
            self._endpoint_cache[ep.agent] = ep

    # -- rejects and accepted messages ------------------------------------------------------------------------
    def count_reject(self, sender: str, status: str, now: float, n: int = 1) -> None:
        self._db.execute(
            """INSERT INTO rejects (sender, status, count, last_at) VALUES (?, ?, ?, ?)
               ON CONFLICT (sender, status) DO UPDATE SET count = rejects.count + excluded.count,
                   last_at = CASE WHEN excluded.last_at > rejects.last_at THEN excluded.last_at
                                  ELSE rejects.last_at END""",
            (sender, status, n, now),
        )

    def save_reject_window(
        self, owner: str, sender: str, opened: float, updated: float, summary: str
    ) -> None:
        self._db.execute(
            """INSERT INTO reject_windows (owner, sender, opened, updated, summary) VALUES (?,?,?,?,?)
               ON CONFLICT (owner, sender) DO UPDATE SET opened = excluded.opened, updated = excluded.updated,
                   summary = excluded.summary""",
            (owner, sender, opened, updated, summary),
        )

    def delete_reject_window(self, owner: str, sender: str, *, updated_before: float | None = None) -> bool:
        """Forget a persisted window (it was audited); with ``updated_before`` only if still that old."""
        if updated_before is None:
            cur = self._db.execute(
                "DELETE FROM reject_windows WHERE owner = ? AND sender = ?", (owner, sender)
            )
        else:
            cur = self._db.execute(
                "DELETE FROM reject_windows WHERE owner = ? AND sender = ? AND updated < ?",
                (owner, sender, updated_before),
            )
        return cur.rowcount == 1

    def reject_windows(
        self, *, updated_before: float, other_than: str
    ) -> list[tuple[str, str, float, float, str]]:
        """Windows of other processes not touched since ``updated_before``: (owner, sender, opened,
        updated, summary JSON)."""
        rows = self._db.execute(
            """SELECT owner, sender, opened, updated, summary FROM reject_windows
               WHERE owner != ? AND updated < ? ORDER BY opened""",
            (other_than, updated_before),
        ).fetchall()
        return [(str(r[0]), str(r[1]), float(r[2]), float(r[3]), str(r[4])) for r in rows]

    def reject_counts(self) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = {}
        for sender, status, count in self._db.execute("SELECT sender, status, count FROM rejects"):
            counts.setdefault(sender, {})[status] = count
        return counts

    def record_message(
        self,
        agent: str,
        seq: int,
        kind: str,
        digest: str,
        now: float,
        *,
        ts: float | None = None,
        late_s: float | None = None,
    ) -> bool:
        """``ts``: the envelope's; ``late_s``: how late (ingest's ``late_by``), None when fresh."""
        cur = self._db.execute(
            "INSERT INTO messages (agent, seq, kind, digest, received, ts, late_s) VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (agent, seq) DO NOTHING",
            (agent, seq, kind, digest, now, ts, late_s),
        )
        return cur.rowcount == 1

    def prune_messages(self, before: float) -> int:
        """Forget de-duplication digests received before ``before`` (redeliveries come within minutes).
        Only sealed ones: the audit covers them by their batch's Merkle root; proofs for them end here."""
        return self._db.execute(
            "DELETE FROM messages WHERE received < ? AND batch IS NOT NULL", (before,)
        ).rowcount

    def message_digest(self, agent: str, seq: int) -> str | None:
        row = self._db.execute(
            "SELECT digest FROM messages WHERE agent = ? AND seq = ?", (agent, seq)
        ).fetchone()
        return None if row is None else str(row[0])

    # -- events --------------------------------------------------------------------------------------------
    def add_event(
        self,
        agent: str,
        seq: int,
        *,
        kind: str,
        ts: float,
        at: float,
        severity: str,
        blocked: bool,
        details: dict[str, Any],
        now: float,
    ) -> bool:
        """Store an event once per (agent, seq); ``False`` for a duplicate."""
        cur = self._db.execute(
            """INSERT INTO events (agent, seq, kind, ts, at, severity, blocked, details, received)
               VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT (agent, seq) DO NOTHING""",
            (agent, seq, kind, ts, at, severity, blocked, json.dumps(details), now),
        )
        return cur.rowcount == 1

    def events(
        self, limit: int = 1000, agent: str | None = None, before_seq: int | None = None
    ) -> list[dict[str, Any]]:
        """The newest ``limit`` events, newest first: new events never fall behind a full page of old ones.
        With ``agent``, that agent's below ``before_seq`` (its next page), by seq."""
        if agent is not None:
            below = "" if before_seq is None else " AND seq < ?"
            params = (agent, limit) if before_seq is None else (agent, before_seq, limit)
            rows = self._db.execute(
                f"SELECT * FROM events WHERE agent = ?{below} ORDER BY seq DESC LIMIT ?",  # noqa: S608
                params,
            ).fetchall()
        else:
            rows = self._db.execute(
                f"SELECT * FROM events ORDER BY received DESC, {self._db.insertion_order} DESC LIMIT ?",  # noqa: S608
                (limit,),
            ).fetchall()
        return [
            {
                "agent": r["agent"],
                "kind": r["kind"],
                "seq": r["seq"],
                "ts": r["ts"],
                "at": r["at"],
                "received": r["received"],  # received - ts: how late it came (history after an outage)
                "severity": r["severity"],
                "blocked": bool(r["blocked"]),
                "details": json.loads(r["details"]),
            }
            for r in rows
        ]

    # -- sessions ------------------------------------------------------------------------------------------
    def sessions(self, agent: str | None = None) -> list[SessionRecord]:
        if agent:
            rows = self._db.execute("SELECT * FROM sessions WHERE agent = ? ORDER BY started, id", (agent,))
        else:
            rows = self._db.execute("SELECT * FROM sessions ORDER BY agent, started, id")
        return [self._session(r) for r in rows]

    def session(self, agent: str, session_id: str) -> SessionRecord | None:
        row = self._db.execute(
            "SELECT * FROM sessions WHERE agent = ? AND id = ?", (agent, session_id)
        ).fetchone()
        return None if row is None else self._session(row)

    # Per-message reads (ingest): indexed on (agent, state), so their cost follows the agent's *open*
    # sessions (bounded by decide.MAX_OPEN_SESSIONS), never how many it ever had.
    def open_sessions(self, agent: str) -> list[SessionRecord]:
        rows = self._db.execute(
            "SELECT * FROM sessions WHERE agent = ? AND state IN ('running', 'ending') ORDER BY started, id",
            (agent,),
        )
        return [self._session(r) for r in rows]

    def count_open_sessions(self, agent: str) -> int:
        row = self._db.execute(
            "SELECT COUNT(*) FROM sessions WHERE agent = ? AND state IN ('running', 'ending')", (agent,)
        ).fetchone()
        return int(row[0])

    def sessions_among(self, agent: str, ids: list[str]) -> dict[str, SessionRecord]:
        """The stored sessions of ``agent`` among ``ids`` (any state), by id."""
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))  # an agent's reported sessions: bounded by the message size
        rows = self._db.execute(
            f"SELECT * FROM sessions WHERE agent = ? AND id IN ({marks})",  # noqa: S608 (marks only)
            (agent, *ids),
        )
        return {r["id"]: self._session(r) for r in rows}

    @staticmethod
    def _session(r: Row) -> SessionRecord:
        return SessionRecord(
            agent=r["agent"],
            id=r["id"],
            state=SessionState(r["state"]),
            client=r["client"],
            pid=r["pid"],
            user=r["user"],
            started=r["started"],
            ended_reason=r["ended_reason"],
            ending_reason=r["ending_reason"],
            command_id=r["command_id"],
            command_result=r["command_result"],
            command_condition=r["command_condition"],
        )

    def save_session(self, s: SessionRecord) -> None:
        self._db.execute(
            """INSERT INTO sessions (agent, id, state, client, pid, "user", started, ended_reason,
                   ending_reason, command_id, command_result, command_condition, updated)
               VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)
               ON CONFLICT (agent, id) DO UPDATE SET state = excluded.state, client = excluded.client,
                   pid = excluded.pid, "user" = excluded."user", started = excluded.started,
                   ended_reason = excluded.ended_reason, ending_reason = excluded.ending_reason,
                   command_id = excluded.command_id, command_result = excluded.command_result,
                   command_condition = excluded.command_condition, updated = excluded.updated""",
            (
                s.agent,
                s.id,
                s.state.value,
                s.client,
                s.pid,
                s.user,
                s.started,
                s.ended_reason,
                s.ending_reason,
                s.command_id,
                s.command_result,
                s.command_condition,
                time.time(),
            ),
        )

    # -- decisions -----------------------------------------------------------------------------------------
    def add_decision(
        self, agent: str, ts: float, condition: str, reasons: list[str], actions: list[dict[str, Any]]
    ) -> int:
        row = self._db.execute(
            "INSERT INTO decisions (agent, ts, condition, reasons, actions) VALUES (?, ?, ?, ?, ?) RETURNING id",
            (agent, ts, condition, json.dumps(reasons), json.dumps(actions)),
        ).fetchone()
        return int(row[0])

    def decisions(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT * FROM decisions ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [
            {
                "id": r["id"],
                "agent": r["agent"],
                "ts": r["ts"],
                "condition": r["condition"],
                "reasons": json.loads(r["reasons"]),
                "actions": json.loads(r["actions"]),
            }
            for r in rows
        ]

    # -- commands ------------------------------------------------------------------------------------------
    def save_command(self, c: CommandRecord) -> None:
        self._db.execute(
            """INSERT INTO commands (id, agent, session_id, action, reason, state, attempts, created,
                   last_sent, result, detail, sessions, nonce, expires_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)
               ON CONFLICT (id) DO UPDATE SET agent = excluded.agent, session_id = excluded.session_id,
                   action = excluded.action, reason = excluded.reason, state = excluded.state,
                   attempts = excluded.attempts, created = excluded.created, last_sent = excluded.last_sent,
                   result = excluded.result, detail = excluded.detail, sessions = excluded.sessions,
                   nonce = excluded.nonce, expires_at = excluded.expires_at""",
            (
                c.id,
                c.agent,
                c.session_id,
                c.action,
                c.reason,
                c.state.value,
                c.attempts,
                c.created,
                c.last_sent,
                c.result,
                c.detail,
                json.dumps(list(c.sessions)),
                c.nonce,
                c.expires_at,
            ),
        )

    def count_pending_commands(self, agent: str) -> int:
        row = self._db.execute(
            "SELECT COUNT(*) FROM commands WHERE agent = ? AND state = ?", (agent, CommandState.PENDING.value)
        ).fetchone()
        return int(row[0])

    def command(self, command_id: str) -> CommandRecord | None:
        row = self._db.execute("SELECT * FROM commands WHERE id = ?", (command_id,)).fetchone()
        return None if row is None else self._command(row)

    def commands(self, state: CommandState | None = None) -> list[CommandRecord]:
        if state is None:
            rows = self._db.execute("SELECT * FROM commands ORDER BY created").fetchall()
        else:
            rows = self._db.execute(
                "SELECT * FROM commands WHERE state = ? ORDER BY created", (state.value,)
            ).fetchall()
        return [self._command(r) for r in rows]

    @staticmethod
    def _command(r: Row) -> CommandRecord:
        return CommandRecord(
            id=r["id"],
            agent=r["agent"],
            session_id=r["session_id"],
            action=r["action"],
            reason=r["reason"],
            state=CommandState(r["state"]),
            attempts=r["attempts"],
            created=r["created"],
            last_sent=r["last_sent"],
            result=r["result"],
            detail=r["detail"],
            sessions=tuple(json.loads(r["sessions"])),
            nonce=r["nonce"],
            expires_at=r["expires_at"],
        )

    # -- desktops (portable SQL: ON CONFLICT, no SQLite-only functions) -------------------------------------
    def add_desktop(self, d: Desktop) -> bool:
        """Insert a newly configured desktop; ``False`` when it is already known (its state is kept)."""
        cur = self._db.execute(
            """INSERT INTO desktops (id, pool, state, reason, detail, updated) VALUES (?, ?, ?, ?, ?, ?)
               ON CONFLICT (id) DO NOTHING""",
            (d.id, d.pool, d.state.value, d.reason, d.detail, d.updated),
        )
        return cur.rowcount == 1

    def save_desktop(self, d: Desktop) -> None:
        self._db.execute(
            """INSERT INTO desktops (id, pool, state, agent, session_id, user_name, reason, attempts,
                   next_attempt_at, last_wiped, detail, updated) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)
               ON CONFLICT (id) DO UPDATE SET pool=excluded.pool, state=excluded.state, agent=excluded.agent,
                   session_id=excluded.session_id, user_name=excluded.user_name, reason=excluded.reason,
                   attempts=excluded.attempts, next_attempt_at=excluded.next_attempt_at,
                   last_wiped=excluded.last_wiped, detail=excluded.detail, updated=excluded.updated""",
            (d.id, d.pool, d.state.value, d.agent, d.session_id, d.user, d.reason, d.attempts,
             d.next_attempt_at, d.last_wiped, d.detail, d.updated),
        )  # fmt: skip

    def desktop(self, desktop_id: str) -> Desktop | None:
        row = self._db.execute("SELECT * FROM desktops WHERE id = ?", (desktop_id,)).fetchone()
        return None if row is None else self._desktop(row)

    def desktops(self, states: tuple[str, ...] = ()) -> list[Desktop]:
        if states:
            marks = ", ".join("?" for _ in states)
            rows = self._db.execute(
                f"SELECT * FROM desktops WHERE state IN ({marks}) ORDER BY id",  # noqa: S608 (marks only)
                states,
            )
        else:
            rows = self._db.execute("SELECT * FROM desktops ORDER BY id")
        return [self._desktop(r) for r in rows]

    def desktop_of_session(self, agent: str, session_id: str) -> Desktop | None:
        row = self._db.execute(
            "SELECT * FROM desktops WHERE agent = ? AND session_id = ?", (agent, session_id)
        ).fetchone()
        return None if row is None else self._desktop(row)

    @staticmethod
    def _desktop(r: Row) -> Desktop:
        return Desktop(
            id=r["id"],
            pool=r["pool"],
            state=DesktopState(r["state"]),
            agent=r["agent"],
            session_id=r["session_id"],
            user=r["user_name"],
            reason=r["reason"],
            attempts=r["attempts"],
            next_attempt_at=r["next_attempt_at"],
            last_wiped=r["last_wiped"],
            detail=r["detail"],
            updated=r["updated"],
        )

    def open_desktop_session(
        self, desktop: str, agent: str, session_id: str, user: str | None, address: str | None, now: float
    ) -> None:
        """Which worker (user id) on which endpoint had which desktop, from when."""
        self._db.execute(
            """INSERT INTO desktop_sessions (desktop, agent, session_id, user_name, address, started)
               VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (desktop, agent, session_id) DO NOTHING""",
            (desktop, agent, session_id, user, address, now),
        )

    def close_desktop_session(self, desktop: str, agent: str, session_id: str, now: float) -> None:
        self._db.execute(
            """UPDATE desktop_sessions SET ended = ? WHERE desktop = ? AND agent = ? AND session_id = ?
               AND ended IS NULL""",
            (now, desktop, agent, session_id),
        )

    def desktop_sessions(self, desktop: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        where = "" if desktop is None else " WHERE desktop = ?"
        params: tuple[Any, ...] = () if desktop is None else (desktop,)
        rows = self._db.execute(
            f"SELECT * FROM desktop_sessions{where} ORDER BY started DESC LIMIT ?",  # noqa: S608
            (*params, limit),
        )
        return [
            {k: r[k] for k in ("desktop", "agent", "session_id", "user_name", "address", "started", "ended")}
            for r in rows
        ]

    def claim_desktop(self, desktop: str, owner: str, *, now: float, lease_s: float) -> bool:
        """Take (or keep) the right to drive ``desktop`` until ``now + lease_s``: granted when nobody holds
        it, ``owner`` already does, or the holder's lease has lapsed. One conditional upsert, so two
        controllers racing for it cannot both win (portable: ``ON CONFLICT ... DO UPDATE ... WHERE``)."""
        with self.transaction() as db:
            cur = db.execute(
                """INSERT INTO desktop_claims (desktop, owner, lease_until, claimed) VALUES (?, ?, ?, ?)
                   ON CONFLICT (desktop) DO UPDATE SET owner = excluded.owner,
                       lease_until = excluded.lease_until,
                       claimed = CASE WHEN desktop_claims.owner = excluded.owner
                                      THEN desktop_claims.claimed ELSE excluded.claimed END
                   WHERE desktop_claims.owner = excluded.owner OR desktop_claims.lease_until < ?""",
                (desktop, owner, now + lease_s, now, now),
            )
            return cur.rowcount == 1

    def renew_desktop_claims(self, owner: str, *, now: float, lease_s: float) -> int:
        """Extend every lease ``owner`` holds (one statement however many desktops it drives); how many."""
        with self.transaction() as db:
            cur = db.execute(
                "UPDATE desktop_claims SET lease_until = ? WHERE owner = ?", (now + lease_s, owner)
            )
            return cur.rowcount

    def release_desktop_claim(self, desktop: str, owner: str) -> bool:
        with self.transaction() as db:
            cur = db.execute("DELETE FROM desktop_claims WHERE desktop = ? AND owner = ?", (desktop, owner))
            return cur.rowcount == 1

    def desktop_claims(self) -> dict[str, tuple[str, float]]:
        """desktop → (owner, lease_until), for `desktops list` and tests."""
        rows = self._db.execute("SELECT desktop, owner, lease_until FROM desktop_claims")
        return {r["desktop"]: (r["owner"], r["lease_until"]) for r in rows}

    # -- audit ---------------------------------------------------------------------------------------------
    def append_audit(
        self, kind: str, actor: str, subject: str, data: dict[str, Any], ts: float | None = None
    ) -> AuditEntry:
        """Chain and store one entry. The tip is read inside the write transaction (several writers: the
        daemon, CLI commands, other processes of a share group) and cached until that transaction ends."""
        with self.transaction() as db:
            if self._tip is None:
                row = db.execute("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
                # none left: everything was archived, the chain goes on from the archived base (or genesis)
                self._tip = (int(row[0]), str(row[1])) if row else self._base_tip()
            prev_id, prev_hash = self._tip
            entry = make_entry(
                prev_id,
                prev_hash,
                ts=time.time() if ts is None else ts,
                kind=kind,
                actor=actor,
                subject=subject,
                data=data,
            )
            db.execute(
                "INSERT INTO audit (id, ts, kind, actor, subject, data, prev_hash, hash) VALUES (?,?,?,?,?,?,?,?)",
                (
                    entry.id,
                    entry.ts,
                    entry.kind,
                    entry.actor,
                    entry.subject,
                    entry.data_json,
                    prev_hash,
                    entry.hash,
                ),
            )
            self._tip = (entry.id, entry.hash)
            self._head_dirty = True
        return entry

    def _base_tip(self) -> tuple[int, str]:
        base = self.audit_base()
        return base.id, base.hash

    def _write_head(self) -> None:
        tip = self._tip
        if tip is None:
            row = self._db.execute("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
            tip = (int(row[0]), str(row[1])) if row else self._base_tip()
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES ('audit_head', ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (json.dumps({"id": tip[0], "hash": tip[1]}),),
        )

    def audit_entries(self, after_id: int = 0, limit: int | None = None) -> Iterator[AuditEntry]:
        """Entries in id order, streamed from one statement (a consistent snapshot under WAL): ``audit verify``
        walks millions in constant memory."""
        q = "SELECT id, ts, kind, actor, subject, data, prev_hash, hash FROM audit WHERE id > ? ORDER BY id"
        params: tuple[int, ...] = (after_id,)
        if limit is not None:
            q += " LIMIT ?"
            params = (after_id, limit)
        # plain tuples: a named tuple is made from each without conversions
        yield from map(AuditEntry._make, self._db.stream(q, params, 1000))

    @contextmanager
    def audit_snapshot(self) -> Iterator[None]:
        """One read transaction: the head, the base and the entries read inside it belong together while the
        daemon keeps appending."""
        if self._db.in_transaction:
            yield
            return
        self._db.begin_read()
        try:
            yield
        finally:
            self._db.commit()

    def audit_entry(self, entry_id: int) -> AuditEntry | None:
        """Entry ``entry_id``; None when there is none (archived: the next one is not it)."""
        entry = next(self.audit_entries(entry_id - 1, 1), None) if entry_id > 0 else None
        return entry if entry is not None and entry.id == entry_id else None

    def audit_base(self) -> ChainHead:
        """The last archived entry (the remaining chain continues from it), or genesis."""
        base_id, base_hash = self.get_meta("audit_base_id"), self.get_meta("audit_base_hash")
        if base_id is None or base_hash is None:
            return GENESIS_HEAD
        return ChainHead(int(base_id), base_hash)

    def drop_archived_audit(self, upto: ChainHead) -> int:
        """``audit archive``'s delete, the only one the trigger allows: entries up to ``upto`` (written to an
        archive file and checked first) go; the chain continues from ``upto``. Returns how many went."""
        with self.transaction() as db:
            self.set_meta("audit_base_id", str(upto.id))
            self.set_meta("audit_base_hash", upto.hash)
            return int(db.execute("DELETE FROM audit WHERE id <= ?", (upto.id,)).rowcount)

    # -- Merkle batches over accepted messages (audit/sealer.py) ----------------------------------------------
    def unsealed_messages(self, limit: int) -> list[tuple[str, int, str, str, float | None]]:
        """Stored messages no batch covers yet, (agent, seq, kind, digest, late_s) in the order they become
        leaves."""
        rows = self._db.execute(
            "SELECT agent, seq, kind, digest, late_s FROM messages WHERE batch IS NULL"
            " ORDER BY received, agent, seq LIMIT ?",
            (limit,),
        )
        return [(str(r[0]), int(r[1]), str(r[2]), str(r[3]), r[4]) for r in rows]

    def oldest_unsealed(self) -> float | None:
        row = self._db.execute("SELECT MIN(received) FROM messages WHERE batch IS NULL").fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def mark_sealed(self, entry_id: int, keys: list[tuple[str, int]]) -> None:
        """Messages ``keys`` are leaves 0, 1, … of the batch audited as entry ``entry_id``."""
        self._db.executemany(
            "UPDATE messages SET batch = ?, leaf = ? WHERE agent = ? AND seq = ?",
            [(entry_id, i, agent, seq) for i, (agent, seq) in enumerate(keys)],
        )

    def message_leaf(self, agent: str, seq: int) -> tuple[str, str, int | None, int | None] | None:
        """(kind, digest, batch entry id, leaf index) of a stored message; batch None until sealed."""
        row = self._db.execute(
            "SELECT kind, digest, batch, leaf FROM messages WHERE agent = ? AND seq = ?", (agent, seq)
        ).fetchone()
        if row is None:
            return None
        return str(row[0]), str(row[1]), row[2], row[3]

    def batch_leaves(self, entry_id: int) -> list[tuple[str, int, str, str]]:
        rows = self._db.execute(
            "SELECT agent, seq, kind, digest FROM messages WHERE batch = ? ORDER BY leaf", (entry_id,)
        )
        return [(str(r[0]), int(r[1]), str(r[2]), str(r[3])) for r in rows]

    def audit_head(self) -> ChainHead | None:
        raw = self.get_meta("audit_head")
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            return ChainHead(int(data["id"]), str(data["hash"]))
        except (ValueError, KeyError, TypeError):
            return ChainHead(-1, "unreadable head record")
