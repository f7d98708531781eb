"""The audit hash chain: intact chains verify; each kind of tampering is named with the first bad entry.

Every store-level test runs on SQLite and on a real PostgreSQL (``open_store``). Tampering goes through the
database's own connection, after dropping the append-only triggers as an attacker with write access to the
database would.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cleanroom_controller import GENESIS, ChainHead, Store, Tamper, make_entry, verify_chain
from cleanroom_controller.audit.chain import AuditEntry, Mark
from cleanroom_controller.audit.checkpoints import sign_checkpoint
from cleanroom_controller.audit.verify import verify_store
from cleanroom_protocol import canonical_json
from tests.conftest import StoreOpener


@pytest.fixture
def store(open_store: StoreOpener) -> Store:
    s = open_store()
    for i in range(1, 7):
        s.append_audit("verdict", "a1", "a1", {"n": i, "status": "ok"}, ts=1000.0 + i)
    return s


def raw(store: Store) -> Any:
    """The store's connection (autocommit, ``?`` placeholders on both dialects) without the triggers."""
    db = store._db
    if store.dialect == "sqlite":
        db.execute("DROP TRIGGER audit_no_update")
        db.execute("DROP TRIGGER audit_no_delete")
    else:
        db.execute("DROP TRIGGER audit_no_change ON audit")
    return db


def check(store: Store) -> tuple[int, Tamper] | None:
    problem = verify_chain(list(store.audit_entries()), store.audit_head())
    return None if problem is None else (problem.entry_id, problem.tamper)


def rehash(db: Any, from_id: int) -> tuple[int, str]:
    """What a careful attacker does: recompute every hash from ``from_id`` on (but not the head record).
    Returns the rewritten chain's last id and hash (what the head record would need to say)."""
    rows = db.execute(
        "SELECT id, ts, kind, actor, subject, data FROM audit WHERE id >= ? ORDER BY id", (from_id,)
    )
    prev = db.execute("SELECT hash FROM audit WHERE id < ? ORDER BY id DESC LIMIT 1", (from_id,)).fetchone()
    prev_hash = prev[0] if prev else GENESIS
    last = from_id - 1
    for id_, ts, kind, actor, subject, data in rows.fetchall():
        entry = {
            "id": id_,
            "ts": ts,
            "kind": kind,
            "actor": actor,
            "subject": subject,
            "data": json.loads(data),
        }
        h = hashlib.sha256(prev_hash.encode() + canonical_json(entry)).hexdigest()
        db.execute("UPDATE audit SET prev_hash = ?, hash = ? WHERE id = ?", (prev_hash, h, id_))
        prev_hash, last = h, id_
    return last, prev_hash


def test_intact_chain_verifies(store: Store) -> None:
    assert check(store) is None
    assert [e.id for e in store.audit_entries()] == [1, 2, 3, 4, 5, 6]


def test_pure_chain_links_each_entry_to_the_previous() -> None:
    first = make_entry(0, GENESIS, ts=1.0, kind="k", actor="x", subject="s", data={"a": 1})
    second = make_entry(first.id, first.hash, ts=2.0, kind="k", actor="x", subject="s", data={"a": 2})
    assert verify_chain([first, second], ChainHead(2, second.hash)) is None
    assert verify_chain([second, first]) is not None


def test_store_refuses_update_and_delete(store: Store) -> None:
    db = store._db
    with pytest.raises(Exception, match="append-only"):
        db.execute("UPDATE audit SET kind = 'x' WHERE id = 2")
    with pytest.raises(Exception, match="append-only"):
        db.execute("DELETE FROM audit WHERE id = 2")
    assert [e.kind for e in store.audit_entries()] == ["verdict"] * 6


def test_edit_is_named(store: Store) -> None:
    raw(store).execute("""UPDATE audit SET data = '{"n":3,"status":"bad_signature"}' WHERE id = 3""")
    assert check(store) == (3, Tamper.EDITED)


def test_edit_with_recomputed_hashes_is_caught_by_the_head(store: Store) -> None:
    db = raw(store)
    db.execute("""UPDATE audit SET data = '{"n":3,"status":"bad_signature"}' WHERE id = 3""")
    rehash(db, 3)
    assert check(store) == (6, Tamper.EDITED)


def test_edit_with_recomputed_own_hash_names_the_edited_entry(store: Store) -> None:
    db = raw(store)
    db.execute("""UPDATE audit SET data = '{"n":3,"status":"bad_signature"}' WHERE id = 3""")
    row = db.execute(
        "SELECT id, ts, kind, actor, subject, data, prev_hash FROM audit WHERE id = 3"
    ).fetchone()
    entry = {
        "id": 3,
        "ts": row[1],
        "kind": row[2],
        "actor": row[3],
        "subject": row[4],
        "data": json.loads(row[5]),
    }
    h = hashlib.sha256(row[6].encode() + canonical_json(entry)).hexdigest()
    db.execute("UPDATE audit SET hash = ? WHERE id = 3", (h,))
    assert check(store) == (3, Tamper.EDITED)


def test_delete_is_named(store: Store) -> None:
    raw(store).execute("DELETE FROM audit WHERE id = 4")
    assert check(store) == (4, Tamper.DELETED)


def test_delete_with_renumbering_is_named(store: Store) -> None:
    db = raw(store)
    db.execute("DELETE FROM audit WHERE id = 4")
    db.execute("UPDATE audit SET id = id - 1 WHERE id > 4")
    assert check(store) == (4, Tamper.DELETED)


def test_delete_at_the_end_is_named(store: Store) -> None:
    raw(store).execute("DELETE FROM audit WHERE id = 6")
    assert check(store) == (6, Tamper.DELETED)


def insert(db: Any, id_: int, entry: AuditEntry) -> None:
    """A well-formed entry written straight into the table under ``id_``."""
    db.execute(
        "INSERT INTO audit VALUES (?,?,?,?,?,?,?,?)",
        (id_, entry.ts, entry.kind, entry.actor, entry.subject, entry.data_json, entry.prev_hash, entry.hash),
    )


def test_insert_is_named(store: Store) -> None:
    db = raw(store)
    # Make room after entry 3 and insert a well-formed entry chained to it.
    db.execute("UPDATE audit SET id = id + 1000 WHERE id > 3")
    db.execute("UPDATE audit SET id = id - 999 WHERE id > 1000")
    prev = db.execute("SELECT hash FROM audit WHERE id = 3").fetchone()[0]
    forged = make_entry(3, prev, ts=1003.5, kind="verdict", actor="a1", subject="a1", data={"n": 99})
    insert(db, 4, forged)
    assert check(store) == (4, Tamper.INSERTED)


def test_insert_at_the_end_is_named(store: Store) -> None:
    db = raw(store)
    prev = db.execute("SELECT hash FROM audit WHERE id = 6").fetchone()[0]
    forged = make_entry(6, prev, ts=1007.0, kind="verdict", actor="a1", subject="a1", data={"n": 99})
    insert(db, 7, forged)
    assert check(store) == (7, Tamper.INSERTED)


def test_reorder_is_named(store: Store) -> None:
    db = raw(store)
    db.execute("UPDATE audit SET id = 100 WHERE id = 3")
    db.execute("UPDATE audit SET id = 3 WHERE id = 4")
    db.execute("UPDATE audit SET id = 4 WHERE id = 100")
    assert check(store) == (3, Tamper.REORDERED)


def test_store_append_chains_across_writers(open_store: StoreOpener) -> None:
    """The daemon and the CLI both append: each reads the tip inside its transaction."""
    a, b = open_store(), open_store()
    a.append_audit("x", "daemon", "s", {})
    b.append_audit("operator.agents_add", "operator:root", "a1", {})
    a.append_audit("x", "daemon", "s", {})
    assert check(a) is None
    assert [e.id for e in a.audit_entries()] == [1, 2, 3]


@pytest.mark.parametrize(
    ("ts", "actor", "subject", "data"),
    [
        (1000.0, "a1", "a1", {"n": 1, "status": "ok"}),
        (
            1763849999.123456,
            'ctl:"x"\\',
            "é ü 漢 \u2028 \x01",
            {"nested": {"b": [1, 2.5, None, True]}, "a": "z"},
        ),
        (1e-7, "", "", {}),
        (1e16, "x", "y", {"big": 2**62, "neg": -0.0, "s": "\ud7ff"}),
        (5, "int-ts", "s", {"k": [{"z": 1, "a": 2}]}),
    ],
)
def test_fast_entry_hash_equals_the_reference(ts: float, actor: str, subject: str, data: dict) -> None:
    """make_entry assembles the canonical entry without re-parsing ``data``: same hash as entry_hash."""
    from cleanroom_controller.audit import entry_hash

    e = make_entry(3, "ab" * 32, ts=ts, kind="verdict", actor=actor, subject=subject, data=data)
    assert e.hash == entry_hash(
        "ab" * 32, id=4, ts=ts, kind="verdict", actor=actor, subject=subject, data_json=e.data_json
    )
    assert (
        verify_chain([make_entry(0, GENESIS, ts=ts, kind="k", actor=actor, subject=subject, data=data)])
        is None
    )


def test_a_batch_chains_in_order_and_writes_the_head_once(open_store: StoreOpener) -> None:
    s = open_store()
    with s.transaction():
        for i in range(5):
            s.append_audit("verdict", "a1", "a1", {"n": i})
        with contextlib.suppress(RuntimeError), s.savepoint():
            s.append_audit("verdict", "a1", "a1", {"n": "rolled back"})
            raise RuntimeError("a bug on one message")
        s.append_audit("verdict", "a1", "a1", {"n": 5})
    entries = list(s.audit_entries())
    assert [e.data["n"] for e in entries] == [0, 1, 2, 3, 4, 5]
    assert verify_chain(entries, s.audit_head()) is None
    assert s.audit_head() == ChainHead(6, entries[-1].hash)


def test_audit_canonical_json_is_the_protocols() -> None:
    from cleanroom_controller.audit import canonical_json as audit_canonical

    for value in ({"b": 1, "a": [1.5, None, "é\u2028"]}, "x", 1e16, {"z": {"y": True}}):
        assert audit_canonical(value) == canonical_json(value)


def test_a_rewrite_with_every_hash_and_the_head_recomputed_is_caught_only_by_a_signed_checkpoint(
    store: Store,
) -> None:
    """verify_store, streaming from the database: the rewritten chain is consistent with its (rewritten) head,
    so only the checkpoint signed before the rewrite names it."""
    key = Ed25519PrivateKey.generate()
    head = store.audit_head()
    assert head is not None
    mark = Mark(sign_checkpoint(key, head, time.time()).at, "checkpoint at entry 6")
    assert verify_store(store, [mark]).ok
    db = raw(store)
    db.execute("""UPDATE audit SET data = '{"n":3,"status":"bad_signature"}' WHERE id = 3""")
    rehash(db, 3)
    last = db.execute("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
    db.execute(
        "UPDATE meta SET value = ? WHERE key = 'audit_head'", (json.dumps({"id": last[0], "hash": last[1]}),)
    )
    assert verify_store(store).ok, "without the checkpoint the rewrite verifies"
    report = verify_store(store, [mark])
    assert report.problem is not None and report.problem.tamper is Tamper.REWRITTEN, report.problem
