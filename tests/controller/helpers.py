"""Builders for controller tests: real keys, real signatures, real policy files."""

from __future__ import annotations

import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel

from cleanroom_controller import Store
from cleanroom_controller.audit.recorder import Recorder
from cleanroom_controller.ingest.pipeline import Ingest, KeyCache
from cleanroom_controller.tracker import Tracker
from cleanroom_protocol import (
    Kind,
    Mode,
    Policy,
    PolicyRef,
    Posture,
    ProcessInfo,
    SessionInfo,
    fingerprint,
    load_policy,
    policy_hash,
    public_key_pem,
    seal,
)

REPO = Path(__file__).resolve().parents[2]
POLICY_FILE = REPO / "policies" / "offshore-billing.toml"


def shipped_policy() -> Policy:
    return load_policy(POLICY_FILE)


def wired_ingest(store: Store, policy: Policy | None = None) -> Ingest:
    """Ingest over ``store`` as the daemon wires it (recorder, tracker, enrolled keys), without the broker:
    ``policy`` (the shipped one by default) judges, decided actions go nowhere."""
    in_force = policy or shipped_policy()
    recorder = Recorder(store, "controller:test")
    tracker = Tracker(store=store, recorder=recorder, policy=lambda: in_force, act=lambda _: None)
    return Ingest(store=store, recorder=recorder, tracker=tracker, keys=KeyCache(store), max_skew_s=300)


def enrol(store: Store, agent: str, key: Ed25519PrivateKey) -> None:
    store.add_agent(agent, public_key_pem(key), fingerprint(key), time.time())


def session(sid: str = "s-100-1", client: str = "xfreerdp", pid: int = 100) -> SessionInfo:
    return SessionInfo(id=sid, client=client, pid=pid, pids=[pid], started=1.0, user="clerk")


def posture(
    agent: str = "a1",
    *,
    policy: Policy | None = None,
    denied: tuple[str, ...] = (),
    sessions: tuple[SessionInfo, ...] = (),
    mode: Mode = Mode.ENFORCE,
) -> Posture:
    p = policy or shipped_policy()
    return Posture(
        agent_id=agent,
        agent_version="0.1.0",
        mode=mode,
        policy=PolicyRef(id=p.id, version=p.version, hash=policy_hash(p)),
        hostname=agent,
        os="Debian 12",
        kernel="6.1",
        display_server="x11",
        boot_time=1.0,
        users=["clerk"],
        mounts=[],
        denied_processes=[ProcessInfo(name=n, pid=200 + i) for i, n in enumerate(denied)],
        sessions=list(sessions),
        enforcers=[],
    )


class Sender:
    """An agent's signing side: its own strictly increasing seq."""

    def __init__(self, agent: str, key: Ed25519PrivateKey | None = None) -> None:
        self.agent = agent
        self.key = key or Ed25519PrivateKey.generate()
        self.seq = 0

    def seal(self, kind: Kind, body: BaseModel, *, seq: int | None = None, ts: float | None = None) -> bytes:
        if seq is None:
            self.seq += 1
            seq = self.seq
        return seal(kind, body, sender=self.agent, seq=seq, key=self.key, ts=ts)


def covered(store: Store) -> list[tuple[str, int, str]]:
    """(agent, seq, kind) of every message the audit covers, read from the audit side: each ``verdict.batch``
    entry's leaves, checked against the root and count it holds (a leaf listed twice shows up twice)."""
    from cleanroom_controller.audit import merkle
    from cleanroom_controller.audit.sealer import BATCH_KIND

    out: list[tuple[str, int, str]] = []
    for e in store.audit_entries():
        if e.kind != BATCH_KIND:
            continue
        leaves = [merkle.Leaf(*row) for row in store.batch_leaves(e.id)]
        assert merkle.root([leaf.hash() for leaf in leaves]).hex() == e.data["root"], f"entry {e.id}"
        assert len(leaves) == e.data["count"], f"entry {e.id}"
        out.extend((leaf.agent, leaf.seq, leaf.kind) for leaf in leaves)
    return out
