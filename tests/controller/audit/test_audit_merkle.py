"""Merkle batches (pure): RFC 6962 roots and audit paths, offline proof checks, the seal policy, signed
checkpoints and the streaming chain walk with marks."""

from __future__ import annotations

import hashlib
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cleanroom_controller.audit import GENESIS, ChainHead, Mark, Tamper, make_entry, merkle, walk_chain
from cleanroom_controller.audit.checkpoints import CheckpointPolicy, sign_checkpoint, signature_ok
from cleanroom_controller.audit.proofs import build_proof, check_proof
from cleanroom_controller.audit.sealer import BATCH_KIND, SealPolicy, batch_data


def leaves(n: int) -> list[merkle.Leaf]:
    return [
        merkle.Leaf(f"a{i % 3}", i + 1, "posture", hashlib.sha256(b"m%d" % i).hexdigest()) for i in range(n)
    ]


def reference_root(hashes: list[bytes]) -> bytes:
    """RFC 6962 2.1 written out independently: split at the largest power of two below n."""
    if len(hashes) == 1:
        return hashes[0]
    k = 1
    while k * 2 < len(hashes):
        k *= 2
    return hashlib.sha256(b"\x01" + reference_root(hashes[:k]) + reference_root(hashes[k:])).digest()


def chain(n: int) -> list:
    out, prev_id, prev_hash = [], 0, GENESIS
    for i in range(n):
        e = make_entry(prev_id, prev_hash, ts=1000.0 + i, kind="k", actor="x", subject="s", data={"n": i})
        out.append(e)
        prev_id, prev_hash = e.id, e.hash
    return out


def test_leaf_hash_is_prefixed_and_canonical() -> None:
    leaf = merkle.Leaf("a1", 7, "event", "ab" * 32)
    assert leaf.encode() == b'{"agent":"a1","digest":"' + b"ab" * 32 + b'","kind":"event","seq":7}'
    assert leaf.hash() == hashlib.sha256(b"\x00" + leaf.encode()).digest()


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33])
def test_every_leaf_of_every_tree_shape_proves_against_the_root(n: int) -> None:
    ls = leaves(n)
    hashes = [leaf.hash() for leaf in ls]
    root = merkle.root(hashes)
    assert root == reference_root(hashes)
    for i in range(n):
        path = merkle.path(hashes, i)
        assert merkle.check_inclusion(ls[i], i, n, path, root)
        assert not merkle.check_inclusion(ls[i], (i + 1) % n, n, path, root) or n == 1
        other = merkle.Leaf(ls[i].agent, ls[i].seq, ls[i].kind, "00" * 32)
        assert not merkle.check_inclusion(other, i, n, path, root)


def test_an_inner_node_cannot_pose_as_a_leaf() -> None:
    """Without the 0x00/0x01 prefixes the two children of a node, presented as one 'leaf', would prove."""
    ls = leaves(4)
    hashes = [leaf.hash() for leaf in ls]
    root = merkle.root(hashes)
    left = merkle.node_hash(hashes[0], hashes[1])
    assert merkle.root_from_path(left, 0, 2, [merkle.node_hash(hashes[2], hashes[3])]) == root  # as a node
    forged = hashlib.sha256(b"\x00" + hashes[0] + hashes[1]).digest()  # the same bytes taken as a leaf
    assert merkle.root_from_path(forged, 0, 2, [merkle.node_hash(hashes[2], hashes[3])]) != root


def test_a_path_of_the_wrong_length_is_refused() -> None:
    ls = leaves(5)
    hashes = [leaf.hash() for leaf in ls]
    path = merkle.path(hashes, 4)
    assert merkle.root_from_path(hashes[4], 4, 5, [*path, path[0]]) is None
    assert merkle.root_from_path(hashes[4], 5, 5, path) is None


def proof_for(n: int, index: int) -> dict:
    ls = leaves(n)
    entry = make_entry(
        41,
        "cd" * 32,
        ts=1234.5,
        kind=BATCH_KIND,
        actor="controller:c",
        subject="messages",
        data=batch_data(ls),
    )
    return build_proof(ls, index, entry)


def test_a_proof_checks_offline_and_names_each_forgery() -> None:
    doc = json.loads(json.dumps(proof_for(9, 6)))  # as read back from a file
    assert check_proof(doc) == []
    assert check_proof(doc, message=b"m6") == []
    assert check_proof(doc, message=b"m5") == ["the message's sha256 is not the leaf's digest"]
    bad_path = json.loads(json.dumps(doc))
    bad_path["path"][1] = "00" * 32
    assert check_proof(bad_path) == ["the path does not lead from leaf 6 of 9 to the root"]
    other_seq = json.loads(json.dumps(doc))
    other_seq["leaf"]["seq"] = 99
    assert "the path does not lead from leaf 6 of 9 to the root" in check_proof(other_seq)
    other_root = json.loads(json.dumps(doc))
    other_root["entry"]["data"]["root"] = "11" * 32
    assert check_proof(other_root) == [
        "the entry holds another root",
        "the entry's hash is not what its fields give",
    ]
    moved = json.loads(json.dumps(doc))
    moved["entry"]["id"] = 43
    assert check_proof(moved) == ["the entry's hash is not what its fields give"]
    assert check_proof({"format": "x"}) == ["not a proof (format is not cleanroom-audit-proof/1)"]
    assert check_proof({"format": "cleanroom-audit-proof/1"})[0].startswith("proof incomplete")


def test_seal_policy() -> None:
    policy = SealPolicy(max_leaves=3, max_age_s=1.0)
    assert not policy.due(0, None, 10.0)
    assert not policy.due(2, 9.5, 10.0)
    assert policy.due(3, 9.9, 10.0)
    assert policy.due(1, 9.0, 10.0)
    with pytest.raises(ValueError, match="seal policy"):
        SealPolicy(max_leaves=0)


def test_checkpoints_are_signed_and_due_at_their_cadence() -> None:
    key = Ed25519PrivateKey.generate()
    cp = sign_checkpoint(key, ChainHead(10, "ab" * 32), 1000.0)
    assert signature_ok(cp, key.public_key())
    assert not signature_ok(cp, Ed25519PrivateKey.generate().public_key())
    forged = type(cp)(11, cp.head, cp.time, cp.sig)
    assert not signature_ok(forged, key.public_key())
    policy = CheckpointPolicy(every_entries=100, every_s=60.0)
    assert policy.due(None, ChainHead(1, "x"), 0.0)
    assert not policy.due(cp, ChainHead(10, "ab" * 32), 5000.0)  # nothing new
    assert not policy.due(cp, ChainHead(50, "x"), 1010.0)
    assert policy.due(cp, ChainHead(110, "x"), 1010.0)
    assert policy.due(cp, ChainHead(11, "x"), 1060.0)


def test_walk_passes_marks_and_names_the_first_that_disagrees() -> None:
    entries = chain(30)
    good = [Mark(ChainHead(10, entries[9].hash), "cp10"), Mark(ChainHead(20, entries[19].hash), "cp20")]
    walk = walk_chain(entries, marks=good)
    assert walk.problem is None and walk.marks_passed == 2 and walk.count == 30
    # A consistent rewrite from entry 15 on: every hash recomputed, so only the marks can tell.
    rewritten = entries[:14]
    prev_id, prev_hash = 14, entries[13].hash
    for i in range(14, 30):
        e = make_entry(prev_id, prev_hash, ts=1000.0 + i, kind="k", actor="x", subject="s", data={"n": -i})
        rewritten.append(e)
        prev_id, prev_hash = e.id, e.hash
    assert walk_chain(rewritten).problem is None
    problem = walk_chain(rewritten, marks=good).problem
    assert problem is not None and problem.tamper is Tamper.REWRITTEN
    assert problem.entry_id == 11 and "cp20" in problem.detail and "entries 11..20" in problem.detail
    # A mark beyond the end: truncated, head record rewritten to match.
    cut = walk_chain(entries[:15], marks=good, head=ChainHead(15, entries[14].hash)).problem
    assert cut is not None and cut.tamper is Tamper.DELETED and "cp20" in cut.detail


def test_walk_starts_after_an_archived_segment() -> None:
    entries = chain(20)
    walk = walk_chain(
        entries[10:], start=ChainHead(10, entries[9].hash), head=ChainHead(20, entries[19].hash)
    )
    assert walk.problem is None and walk.count == 10
    wrong = walk_chain(entries[10:], start=ChainHead(10, "ff" * 32)).problem
    assert wrong is not None and wrong.entry_id == 11
