"""Audit benchmark: bytes of audit per heartbeat, and `audit verify` over ≥ 1 M entries.

(a) Bytes per heartbeat. Heartbeats arrive at R per second (a fleet of E endpoints at a 30 s heartbeat); the
    ingest loop commits them in batches of R / 100 (one transaction per ~10 ms, as the daemon does under a
    steady load) through the real store and the real Sealer (SealPolicy: 1,000 leaves or 1 s), on a
    simulated clock; then the audit table's bytes on disk (SQLite's dbstat: pages, including the index) are
    divided by the heartbeats. Printed beside it, the ceiling it replaces: one `verdict` entry per message (as
    before), and sealing once per ingest transaction.
(b) `cleanroom-controller audit verify --json` (the real CLI, a separate process) over a database of
    --entries entries (default 1,000,000) with a signed checkpoint every 10,000: entries/s and the peak RSS
    of the process; beside it the ceiling of the same machine: sha256 over the same entry bytes in memory,
    and reading the table alone.

    .venv/bin/python bench/audit.py [--entries N] [--only bytes|verify]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cleanroom_controller.audit import GENESIS, entry_bytes, make_entry
from cleanroom_controller.audit.chain import ChainHead
from cleanroom_controller.audit.checkpoints import CHECKPOINTS_NAME, CheckpointFile, sign_checkpoint
from cleanroom_controller.audit.recorder import Recorder
from cleanroom_controller.audit.sealer import Sealer, SealPolicy
from cleanroom_controller.store import Store
from cleanroom_protocol import load_or_create_private_key

CLI = Path(sys.executable).parent / "cleanroom-controller"
HEARTBEAT_S = 30.0


def audit_bytes(store: Store) -> int:
    row = store._db.execute("SELECT SUM(pgsize) FROM dbstat WHERE name = 'audit'").fetchone()
    return int(row[0] or 0)


def heartbeats(endpoints: int, seconds: float, mode: str) -> tuple[float, int, int]:
    """(audit bytes per heartbeat, heartbeats, audit entries) for ``endpoints`` over ``seconds``."""
    rate = endpoints / HEARTBEAT_S
    per_tx = max(1, round(rate / 100))
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(Path(tmp))
        recorder = Recorder(store, "controller:bench")
        sealer = Sealer(store, recorder, SealPolicy())
        n = int(rate * seconds)
        now, seq = 1_800_000_000.0, 0
        for start in range(0, n, per_tx):
            with store.transaction():
                for i in range(start, min(n, start + per_tx)):
                    seq += 1
                    agent = f"agent-{i % endpoints:06d}"
                    digest = hashlib.sha256(b"%d" % seq).hexdigest()
                    store.record_message(agent, seq, "posture", digest, now)
                    if mode == "verdict":  # what every accepted message cost before
                        data = {
                            "topic": f"cleanroom/v1/agents/{agent}/posture",
                            "seq": seq,
                            "retained": False,
                            "bytes": 620,
                            "status": "ok",
                            "kind": "posture",
                            "will": False,
                        }
                        recorder.record("verdict", agent, data, actor=agent)
                    else:
                        sealer.accepted(now)
                if mode == "per_tx":
                    sealer.seal()
                elif mode == "sealer":
                    sealer.after_batch(now)
            now += per_tx / rate
            if mode == "sealer" and int(now) != int(now - per_tx / rate):
                sealer.tick(now)
        sealer.seal_all()
        entries = store._db.execute("SELECT COUNT(*) FROM audit").fetchone()[0]
        size = audit_bytes(store)
        store.close()
    return size / n, n, int(entries)


def bench_bytes() -> None:
    print("(a) audit bytes per routine heartbeat (30 s heartbeat; ingest commits every ~10 ms)")
    print(
        f"{'endpoints':>10} {'msgs/s':>8} {'per tx':>6} {'sealer B/hb':>12} {'per-tx B/hb':>12} "
        f"{'verdict B/hb':>13} {'entries (sealer)':>17}"
    )
    for endpoints, seconds in ((1_000, 120.0), (10_000, 30.0), (100_000, 6.0)):
        sealed, n, entries = heartbeats(endpoints, seconds, "sealer")
        per_tx, _, _ = heartbeats(endpoints, min(seconds, 10.0), "per_tx")
        verdict, _, _ = heartbeats(endpoints, min(seconds, 3.0), "verdict")
        rate = endpoints / HEARTBEAT_S
        print(
            f"{endpoints:>10,} {rate:>8,.0f} {max(1, round(rate / 100)):>6} {sealed:>12.2f} {per_tx:>12.1f} "
            f"{verdict:>13.1f} {entries:>17,} ({n:,} heartbeats)"
        )


def build_chain(data_dir: Path, entries: int) -> None:
    store = Store.open(data_dir)
    key, _ = load_or_create_private_key(data_dir / "controller.key")
    log = CheckpointFile(data_dir / CHECKPOINTS_NAME)
    prev_id, prev_hash, rows = 0, GENESIS, []
    kinds = ("verdict.batch", "decision", "command", "ack", "verdict.summary")
    for i in range(entries):
        kind = kinds[i % 5] if i % 10 else "verdict.batch"
        data = (
            {"count": 300, "root": hashlib.sha256(b"%d" % i).hexdigest()}
            if kind == "verdict.batch"
            else {"condition": "compliant", "reasons": [], "actions": [], "cause_seq": i}
        )
        e = make_entry(
            prev_id,
            prev_hash,
            ts=1.8e9 + i * 0.01,
            kind=kind,
            actor="controller:bench",
            subject=f"agent-{i % 10_000:06d}",
            data=data,
        )
        rows.append(tuple(e))
        prev_id, prev_hash = e.id, e.hash
        if e.id % 10_000 == 0:
            log.append(sign_checkpoint(key, ChainHead(e.id, e.hash), 1.8e9 + i * 0.01))
        if len(rows) == 50_000 or i == entries - 1:
            with store.transaction() as db:
                db.executemany(
                    "INSERT INTO audit (id, ts, kind, actor, subject, data, prev_hash, hash) "
                    "VALUES (?,?,?,?,?,?,?,?)",
                    rows,
                )
                store.set_meta("audit_head", json.dumps({"id": prev_id, "hash": prev_hash}))
            rows = []
    store.close()


def bench_verify(entries: int) -> None:
    print(f"\n(b) audit verify over {entries:,} entries (real CLI process, checkpoint every 10,000)")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        t = time.perf_counter()
        build_chain(data_dir, entries)
        print(
            f"    built in {time.perf_counter() - t:.1f} s; database {(data_dir / 'controller.db').stat().st_size / 1e6:.0f} MB"
        )
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t = time.perf_counter()
        p = subprocess.run(
            [str(CLI), "audit", "verify", "--json", "--data-dir", str(data_dir)],
            capture_output=True,
            text=True,
            check=False,
        )
        wall = time.perf_counter() - t
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        out = json.loads(p.stdout.splitlines()[0])
        assert out["ok"] and out["entries"] == entries, (out, p.stderr[-500:])
        print(
            f"    verify: {out['entries_per_s']:,} entries/s (walk), {entries / wall:,.0f} entries/s (whole "
            f"process incl. start-up, {wall:.1f} s); checkpoints passed {out['checkpoints_passed']}/"
            f"{out['checkpoints']}; peak RSS {max(rss, before) / 1024:.0f} MB"
        )
        # Ceilings on this machine: the table read alone, and sha256 over the same bytes in memory.
        store = Store.open(data_dir)
        t = time.perf_counter()
        n = sum(1 for _ in store.audit_entries())
        read_rate = n / (time.perf_counter() - t)
        sample = list(store.audit_entries(0, 200_000))
        bodies = [
            e.prev_hash.encode()
            + entry_bytes(
                id=e.id, ts=e.ts, kind=e.kind, actor=e.actor, subject=e.subject, data_json=e.data_json
            )
            for e in sample
        ]
        t = time.perf_counter()
        for b in bodies:
            hashlib.sha256(b).hexdigest()
        sha_rate = len(bodies) / (time.perf_counter() - t)
        print(
            f"    ceilings: read the table {read_rate:,.0f} entries/s; sha256 of the entry bytes alone "
            f"{sha_rate:,.0f}/s (one core)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--only", choices=("bytes", "verify"))
    args = ap.parse_args()
    if args.only in (None, "bytes"):
        bench_bytes()
    if args.only in (None, "verify"):
        bench_verify(args.entries)


if __name__ == "__main__":
    main()
