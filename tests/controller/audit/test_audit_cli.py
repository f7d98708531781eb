"""``cleanroom-controller audit …`` run as a real process against a real SQLite file: each kind of tampering
named by ``audit verify`` (a chain rewritten with every later hash recomputed only with the signed
checkpoints), inclusion proofs checked offline, archived segments verifying on their own.

Tampering goes through sqlite3 after dropping the append-only triggers, as an attacker with write access to
the database would.

SQLite only: these tests are about the commands (what they print, their exit codes, the files they write),
which do not depend on the backend; what the commands call (the streamed walk, checkpoints, the archive, the
sealer) runs on SQLite and PostgreSQL in test_audit.py, test_audit_sealer.py and test_audit_archive.py."""

from __future__ import annotations

import gzip
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cleanroom_controller import Store
from cleanroom_controller.audit.checkpoints import CHECKPOINTS_NAME
from cleanroom_protocol import Event, Kind, load_or_create_private_key
from tests.controller.audit.test_audit import rehash
from tests.controller.helpers import Sender, enrol, wired_ingest

CLI = Path(sys.executable).parent / "cleanroom-controller"


def run(*args: str) -> tuple[int, str]:
    p = subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=60)
    assert "Traceback" not in p.stderr, p.stderr
    return p.returncode, p.stdout + p.stderr


def verify(data_dir: Path, *extra: str) -> tuple[int, dict]:
    code, out = run("audit", "verify", "--json", "--data-dir", str(data_dir), *extra)
    return code, json.loads(out.splitlines()[0])


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """30 entries, a controller key, and a checkpoint signed at entry 20 by the real CLI."""
    d = tmp_path / "data"
    store = Store.open(d)
    load_or_create_private_key(d / "controller.key")
    for i in range(1, 21):
        store.append_audit("decision", "controller:c", f"a{i % 3}", {"n": i}, ts=1000.0 + i)
    code, out = run("audit", "checkpoint", "--data-dir", str(d))
    assert code == 0, out
    for i in range(21, 31):
        store.append_audit("decision", "controller:c", f"a{i % 3}", {"n": i}, ts=1000.0 + i)
    store.close()
    return d


def raw(data_dir: Path) -> sqlite3.Connection:
    db = sqlite3.connect(data_dir / "controller.db", isolation_level=None)
    db.execute("DROP TRIGGER audit_no_update")
    db.execute("DROP TRIGGER audit_no_delete")
    return db


def rehash_from(db: sqlite3.Connection, from_id: int) -> None:
    """The careful attacker: every hash from ``from_id`` on recomputed, and the head record too."""
    last, head_hash = rehash(db, from_id)
    db.execute(
        "UPDATE meta SET value = ? WHERE key = 'audit_head'", (json.dumps({"id": last, "hash": head_hash}),)
    )


def test_intact_chain_passes_its_checkpoint(data_dir: Path) -> None:
    code, out = verify(data_dir)
    assert code == 0, out
    assert out["entries"] == 30 and out["checkpoints"] == 1 and out["checkpoints_passed"] == 1


def test_edited_entry_is_named(data_dir: Path) -> None:
    raw(data_dir).execute("""UPDATE audit SET data = '{"n":999}' WHERE id = 7""")
    code, out = verify(data_dir)
    assert (code, out["entry"], out["tamper"]) == (1, 7, "edited")


def test_deleted_entry_is_named(data_dir: Path) -> None:
    raw(data_dir).execute("DELETE FROM audit WHERE id = 12")
    code, out = verify(data_dir)
    assert (code, out["entry"], out["tamper"]) == (1, 12, "deleted")


def test_reordered_entries_are_named(data_dir: Path) -> None:
    db = raw(data_dir)
    db.execute("UPDATE audit SET id = 100 WHERE id = 25")
    db.execute("UPDATE audit SET id = 25 WHERE id = 26")
    db.execute("UPDATE audit SET id = 26 WHERE id = 100")
    code, out = verify(data_dir)
    assert (code, out["entry"], out["tamper"]) == (1, 25, "reordered")


def test_fully_rehashed_chain_is_caught_only_by_the_signed_checkpoint(data_dir: Path) -> None:
    db = raw(data_dir)
    db.execute("""UPDATE audit SET data = '{"n":-5}' WHERE id = 5""")
    rehash_from(db, 5)
    # Without the checkpoint log the rewrite is consistent: the chain alone cannot tell.
    moved = data_dir / "elsewhere.jsonl"
    (data_dir / CHECKPOINTS_NAME).rename(moved)
    code, out = verify(data_dir)
    assert code == 0, out
    moved.rename(data_dir / CHECKPOINTS_NAME)
    code, out = verify(data_dir)
    assert (code, out["tamper"]) == (1, "rewritten"), out
    assert out["entry"] == 1 and "checkpoint of" in out["detail"] and "at entry 20 (line 1)" in out["detail"]
    code, text = run("audit", "verify", "--data-dir", str(data_dir))
    assert code == 1 and "audit chain BROKEN: audit entry 1: rewritten: checkpoint of" in text


def test_forged_checkpoint_is_named(data_dir: Path) -> None:
    log = data_dir / CHECKPOINTS_NAME
    cp = json.loads(log.read_text())
    cp["count"] = 30
    with log.open("a") as f:
        f.write(json.dumps(cp) + "\n")
    code, out = verify(data_dir)
    assert code == 1 and out["checkpoint_problems"] == [
        f"checkpoint of {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(cp['time']))} at entry 30 (line 2): "
        "signature does not verify with the controller key"
    ]


def test_proof_of_an_accepted_message_checks_offline(tmp_path: Path) -> None:
    d = tmp_path / "data"
    store = Store.open(d)
    a1 = Sender("a1")
    enrol(store, "a1", a1.key)
    ingest = wired_ingest(store)
    payloads = [a1.seal(Kind.EVENT, Event(kind=f"e{i}", at=time.time())) for i in range(5)]
    ingest.handle_batch([("cleanroom/v1/agents/a1/events", p, False) for p in payloads])
    code, out = run("audit", "prove", "--agent", "a1", "--seq", "3", "--data-dir", str(d))
    assert code == 2 and "not sealed into a batch yet" in out
    ingest.close()
    code, out = run("audit", "prove", "--agent", "a1", "--seq", "3", "--data-dir", str(d))
    assert code == 0, out
    proof = tmp_path / "proof.json"
    proof.write_text(out)
    message = tmp_path / "message"
    message.write_bytes(payloads[2])
    code, text = run("audit", "check-proof", str(proof), "--message", str(message))
    assert code == 0 and "a1 seq 3 (event) is leaf 2 of 5" in text, text
    message.write_bytes(payloads[1])
    code, text = run("audit", "check-proof", str(proof), "--message", str(message))
    assert code == 1 and "the message's sha256 is not the leaf's digest" in text
    forged = json.loads(out)
    forged["leaf"]["seq"] = 4
    proof.write_text(json.dumps(forged))
    code, text = run("audit", "check-proof", str(proof))
    assert code == 1 and "does not lead from leaf 2 of 5 to the root" in text


def test_archive_moves_a_segment_that_verifies_alone(data_dir: Path, tmp_path: Path) -> None:
    tomorrow = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 86400))
    code, out = run("audit", "archive", "--before", tomorrow, "--data-dir", str(data_dir))
    assert code == 0, out
    archive = data_dir / "audit-archive" / "audit-000000000001-000000000020.jsonl.gz"
    assert archive.exists() and archive.stat().st_mode & 0o777 == 0o600
    db = sqlite3.connect(data_dir / "controller.db", isolation_level=None)
    assert db.execute("SELECT MIN(id), COUNT(*) FROM audit").fetchone() == (
        21,
        11,
    )  # + operator.audit_archive
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("DELETE FROM audit WHERE id = 21")  # only archived entries may go
    code, out_db = verify(data_dir)
    assert code == 0 and out_db["entries"] == 11, out_db
    code, text = run("audit", "verify", "--archive", str(archive), "--data-dir", str(data_dir))
    assert code == 0 and "entries 1..20" in text, text
    # The archive alone: an edited line is named.
    lines = gzip.decompress(archive.read_bytes()).decode().splitlines()
    entry = json.loads(lines[8])
    entry["data_json"] = '{"n":-1}'
    lines[8] = json.dumps(entry)
    forged = tmp_path / "forged.jsonl.gz"
    forged.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    code, text = run("audit", "verify", "--archive", str(forged), "--data-dir", str(data_dir))
    assert code == 1 and "audit entry 8: edited" in text, text
    # Deleting more of the database and claiming it archived: no signed checkpoint has that base.
    raw(data_dir).execute("DELETE FROM audit WHERE id <= 25")
    db.execute("UPDATE meta SET value = '25' WHERE key = 'audit_base_id'")
    code, out_db = verify(data_dir)
    assert (code, out_db["tamper"], out_db["entry"]) == (1, "deleted", 26), out_db


def test_a_message_is_proved_from_its_archive_after_its_row_is_pruned(tmp_path: Path) -> None:
    d = tmp_path / "data"
    store = Store.open(d)
    load_or_create_private_key(d / "controller.key")
    a1 = Sender("a1")
    enrol(store, "a1", a1.key)
    ingest = wired_ingest(store)
    payloads = [a1.seal(Kind.EVENT, Event(kind=f"e{i}", at=time.time())) for i in range(5)]
    ingest.handle_batch([("cleanroom/v1/agents/a1/events", p, False) for p in payloads])
    ingest.close()
    assert run("audit", "checkpoint", "--data-dir", str(d))[0] == 0
    tomorrow = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 86400))
    code, out = run("audit", "archive", "--before", tomorrow, "--data-dir", str(d))
    assert code == 0 and "with 5 message leaves" in out, out
    (archive,) = (d / "audit-archive").iterdir()
    code, out = run("audit", "prove", "--agent", "a1", "--seq", "2", "--data-dir", str(d))
    assert code == 2 and "is archived: prove it from its archive (--archive FILE)" in " ".join(out.split()), (
        out
    )
    store.prune_messages(time.time() + 1)  # 24 h later: the row is gone
    code, out = run("audit", "prove", "--agent", "a1", "--seq", "2", "--data-dir", str(d))
    assert code == 2 and "no stored message a1 seq 2" in out, out
    code, out = run(
        "audit", "prove", "--agent", "a1", "--seq", "2", "--archive", str(archive), "--data-dir", str(d)
    )
    assert code == 0, out
    proof, message = tmp_path / "proof.json", tmp_path / "message"
    proof.write_text(out)
    message.write_bytes(payloads[1])
    code, text = run("audit", "check-proof", str(proof), "--message", str(message))
    assert code == 0 and "a1 seq 2 (event) is leaf 1 of 5" in text, text
    code, text = run("audit", "verify", "--archive", str(archive), "--data-dir", str(d))
    assert code == 0 and "5 message leaves provable" in text, text
