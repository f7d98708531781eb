"""Inclusion proofs: that one accepted message is covered by an audit entry (pure).

A proof is a JSON document (:func:`build_proof`): the leaf (agent, seq, kind, digest), its index and the tree
size, the audit path, the Merkle root, and the whole ``verdict.batch`` entry holding that root with its
chain hash. :func:`check_proof` needs nothing but the document: the path leads from the leaf to the root,
the entry holds that root and count, and the entry's hash is what its fields and ``prev_hash`` give. That
the entry belongs to the controller's chain is then a matter of comparing its hash with a verified chain, an
archive or a later signed checkpoint (``audit verify``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from . import merkle
from .chain import AuditEntry, canonical_json, entry_hash
from .sealer import BATCH_KIND

PROOF_FORMAT = "cleanroom-audit-proof/1"


def build_proof(leaves: Sequence[merkle.Leaf], index: int, entry: AuditEntry) -> dict[str, Any]:
    hashes = [leaf.hash() for leaf in leaves]
    leaf = leaves[index]
    return {
        "format": PROOF_FORMAT,
        "leaf": {"agent": leaf.agent, "seq": leaf.seq, "kind": leaf.kind, "digest": leaf.digest},
        "index": index,
        "size": len(leaves),
        "path": [h.hex() for h in merkle.path(hashes, index)],
        "root": merkle.root(hashes).hex(),
        "entry": {
            "id": entry.id,
            "ts": entry.ts,
            "kind": entry.kind,
            "actor": entry.actor,
            "subject": entry.subject,
            "data": json.loads(entry.data_json),
            "prev_hash": entry.prev_hash,
            "hash": entry.hash,
        },
    }


def _hex32(value: object) -> bytes | None:
    if not isinstance(value, str) or len(value) != 64:
        return None
    try:
        return bytes.fromhex(value)
    except ValueError:
        return None


def check_proof(doc: Mapping[str, Any], *, message: bytes | None = None) -> list[str]:
    """What is wrong with ``doc`` (empty: the message is covered by the entry it names). ``message``: the
    message's bytes as sent, whose sha256 must be the leaf's digest."""
    if doc.get("format") != PROOF_FORMAT:
        return [f"not a proof (format is not {PROOF_FORMAT})"]
    try:
        raw_leaf, entry = doc["leaf"], doc["entry"]
        leaf = merkle.Leaf(
            str(raw_leaf["agent"]), int(raw_leaf["seq"]), str(raw_leaf["kind"]), str(raw_leaf["digest"])
        )
        index, size = int(doc["index"]), int(doc["size"])
        path = [_hex32(p) for p in doc["path"]]
        root = _hex32(doc["root"])
        data = entry["data"]
    except (KeyError, TypeError, ValueError) as exc:
        return [f"proof incomplete: {exc!r}"]
    problems: list[str] = []
    if root is None or any(p is None for p in path) or len(path) > 64:
        return ["root and path must be 64-character hex hashes"]
    if message is not None and hashlib.sha256(message).hexdigest() != leaf.digest:
        problems.append("the message's sha256 is not the leaf's digest")
    if not merkle.check_inclusion(leaf, index, size, [p for p in path if p is not None], root):
        problems.append(f"the path does not lead from leaf {index} of {size} to the root")
    if entry.get("kind") != BATCH_KIND or not isinstance(data, dict):
        problems.append(f"the entry is not a {BATCH_KIND} entry")
    else:
        if data.get("root") != doc["root"]:
            problems.append("the entry holds another root")
        if data.get("count") != size:
            problems.append(f"the entry covers {data.get('count')} messages, the proof says {size}")
    try:
        recomputed = entry_hash(
            str(entry["prev_hash"]),
            id=int(entry["id"]),
            ts=entry["ts"],
            kind=str(entry["kind"]),
            actor=str(entry["actor"]),
            subject=str(entry["subject"]),
            data_json=canonical_json(data).decode("utf-8"),
        )
    except (KeyError, TypeError, ValueError, UnicodeEncodeError) as exc:
        return [*problems, f"entry incomplete: {exc!r}"]
    if recomputed != entry.get("hash"):
        problems.append("the entry's hash is not what its fields give")
    return problems
