"""Archived segments carry their batches' leaves: a message stays provable from the archive after its
``messages`` row is pruned, the proof checks offline, and an archive whose leaves were altered does not verify.
Real ingest (real signatures), real store on SQLite and PostgreSQL, real gzip files, real Ed25519 checkpoints."""

from __future__ import annotations

import gzip
import hashlib
import json
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cleanroom_controller import Store, Tracker
from cleanroom_controller.audit.archive import (
    ArchiveError,
    archive_before,
    prove_from_archive,
    verify_archive,
)
from cleanroom_controller.audit.checkpoints import Checkpointer, CheckpointFile, check_checkpoints
from cleanroom_controller.audit.proofs import check_proof
from cleanroom_controller.audit.recorder import Recorder
from cleanroom_controller.audit.verify import verify_store
from cleanroom_controller.ingest.pipeline import Ingest, KeyCache
from cleanroom_protocol import Channel, Event, Kind, agent_topic
from tests.conftest import StoreOpener
from tests.controller.helpers import Sender, enrol, shipped_policy

EVENTS = agent_topic("a1", Channel.EVENTS)


class World:
    """One store, one agent, ingest sealing only when told (close), a controller key and checkpoint log."""

    def __init__(self, store: Store, tmp_path: Path) -> None:
        self.store = store
        self.a1 = Sender("a1")
        enrol(store, "a1", self.a1.key)
        recorder = Recorder(store, "controller:test")
        rules = shipped_policy()
        tracker = Tracker(store=store, recorder=recorder, policy=lambda: rules, act=lambda _: None)
        self.ingest = Ingest(
            store=store, recorder=recorder, tracker=tracker, keys=KeyCache(store), max_skew_s=300
        )
        self.key = Ed25519PrivateKey.generate()
        self.log = CheckpointFile(tmp_path / "audit-checkpoints.jsonl")
        self.checkpointer = Checkpointer(self.log, self.key)
        self.out = tmp_path / "audit-archive"
        self.payloads: dict[int, bytes] = {}

    def batch(self, n: int) -> list[int]:
        """n events stored and sealed into one verdict.batch entry; their seqs."""
        items = []
        for _ in range(n):
            payload = self.a1.seal(Kind.EVENT, Event(kind="usb.blocked", at=time.time()))
            self.payloads[self.a1.seq] = payload
            items.append((EVENTS, payload, False))
        self.ingest.handle_batch(items)
        self.ingest.close()
        return list(range(self.a1.seq - n + 1, self.a1.seq + 1))

    def archive(self) -> Path:
        self.checkpointer.maybe(self.store.audit_head(), time.time(), force=True)
        report = archive_before(self.store, self.log, self.key.public_key(), time.time() + 3600, self.out)
        assert report is not None
        return report.path


def test_an_archived_message_is_provable_after_its_row_is_pruned(
    open_store: StoreOpener, tmp_path: Path
) -> None:
    w = World(open_store(), tmp_path)
    pruned_first = w.batch(3)
    w.store.prune_messages(time.time() + 1)  # this batch's rows go before it is archived (older than 24 h)
    kept = w.batch(4) + w.batch(2)
    path = w.archive()
    report = verify_archive(path, w.key.public_key())
    assert (report.leaves, report.batches_without_leaves) == (6, 1)
    assert w.store.prune_messages(time.time() + 1) == 6  # now no row of any of them is left
    # Everything up to the head went into the archive: the next entry continues from the archived base.
    w.store.append_audit("operator.audit_archive", "operator:test", path.name, {})
    marks = check_checkpoints(w.log, w.key.public_key())
    report = verify_store(w.store, marks.marks, marks.problems)
    assert report.ok and report.entries == 1, report.problem
    for seq in kept:
        proof = prove_from_archive(path, w.key.public_key(), "a1", seq)
        assert proof["leaf"]["seq"] == seq
        assert check_proof(proof, message=w.payloads[seq]) == []
        assert proof["leaf"]["digest"] == hashlib.sha256(w.payloads[seq]).hexdigest()
    with pytest.raises(
        ArchiveError, match=r"no archived leaf for a1 seq 1 \(1 batch entries in it were archived"
    ):
        prove_from_archive(path, w.key.public_key(), "a1", pruned_first[0])


def rewrite(path: Path, target: Path, edit: object) -> Path:
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    lines = edit(lines)  # type: ignore[operator]
    target.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    return target


def test_an_archive_whose_leaves_were_altered_or_moved_does_not_verify(
    open_store: StoreOpener, tmp_path: Path
) -> None:
    w = World(open_store(), tmp_path)
    w.batch(5)
    path = w.archive()
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith('{"batch"'))

    def swap_digest(ls: list[str]) -> list[str]:
        doc = json.loads(ls[at])
        doc["leaves"][2][3] = hashlib.sha256(b"another message").hexdigest()
        return [*ls[:at], json.dumps(doc), *ls[at + 1 :]]

    forged = rewrite(path, tmp_path / "forged.jsonl.gz", swap_digest)
    with pytest.raises(ArchiveError, match="5 archived leaves do not give the root and count"):
        verify_archive(forged, w.key.public_key())
    with pytest.raises(ArchiveError, match="do not give the root"):
        prove_from_archive(forged, w.key.public_key(), "a1", 3)

    def drop_a_leaf(ls: list[str]) -> list[str]:
        doc = json.loads(ls[at])
        doc["leaves"].pop()
        return [*ls[:at], json.dumps(doc), *ls[at + 1 :]]

    with pytest.raises(ArchiveError, match="4 archived leaves do not give the root and count"):
        verify_archive(rewrite(path, tmp_path / "short.jsonl.gz", drop_a_leaf), w.key.public_key())

    def move_before_its_entry(ls: list[str]) -> list[str]:
        return [*ls[: at - 1], ls[at], ls[at - 1], *ls[at + 1 :]]

    with pytest.raises(ArchiveError, match="not after its entry"):
        verify_archive(rewrite(path, tmp_path / "moved.jsonl.gz", move_before_its_entry), w.key.public_key())
