"""Merkle trees over accepted messages (pure): one audit entry covers a batch of messages by its root.

RFC 6962 (Certificate Transparency) hashing: ``leaf = sha256(0x00 || leaf bytes)``, ``node = sha256(0x01 ||
left || right)``, so a leaf can never pose as a node; the tree over n leaves splits at the largest power of
two below n. A leaf is the canonical JSON of ``{agent, digest, kind, seq}`` (``digest`` = sha256 hex of the
message bytes as received), so a proof names the message it covers in the clear.

An inclusion proof is what :func:`prove` returns: the leaf's fields, its index, the tree size, the audit path
(sibling hashes, bottom up) and the root. :func:`check_inclusion` recomputes the root from the leaf and the
path (RFC 9162, 2.1.3.2) and needs nothing else.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from .chain import canonical_json

_LEAF = b"\x00"
_NODE = b"\x01"


@dataclass(frozen=True, slots=True)
class Leaf:
    agent: str
    seq: int
    kind: str
    digest: str  # sha256 hex of the message bytes as received

    def encode(self) -> bytes:
        return canonical_json(
            {"agent": self.agent, "digest": self.digest, "kind": self.kind, "seq": self.seq}
        )

    def hash(self) -> bytes:
        return hashlib.sha256(_LEAF + self.encode()).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(_NODE + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two below ``n`` (n ≥ 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def root(leaf_hashes: Sequence[bytes]) -> bytes:
    """The Merkle tree hash of ``leaf_hashes`` (already leaf-hashed); the empty tree is sha256 of nothing."""
    n = len(leaf_hashes)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return leaf_hashes[0]
    k = _split(n)
    return node_hash(root(leaf_hashes[:k]), root(leaf_hashes[k:]))


def path(leaf_hashes: Sequence[bytes], index: int) -> list[bytes]:
    """The audit path of leaf ``index``: sibling hashes from the leaf up to the root (RFC 6962, 2.1.1)."""
    if not 0 <= index < len(leaf_hashes):
        raise ValueError(f"leaf index {index} outside a tree of {len(leaf_hashes)}")
    n = len(leaf_hashes)
    if n == 1:
        return []
    k = _split(n)
    if index < k:
        return [*path(leaf_hashes[:k], index), root(leaf_hashes[k:])]
    return [*path(leaf_hashes[k:], index - k), root(leaf_hashes[:k])]


def root_from_path(leaf_hash: bytes, index: int, size: int, audit_path: Sequence[bytes]) -> bytes | None:
    """The root that ``audit_path`` leads to from ``leaf_hash`` at ``index`` of ``size`` leaves; ``None`` when
    the path cannot belong to such a tree (too long, too short, index outside)."""
    if not 0 <= index < size:
        return None
    fn, sn, r = index, size - 1, leaf_hash
    for p in audit_path:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return r if sn == 0 else None


def check_inclusion(
    leaf: Leaf, index: int, size: int, audit_path: Sequence[bytes], expected_root: bytes
) -> bool:
    return root_from_path(leaf.hash(), index, size, audit_path) == expected_root
