"""The certificate-renewal request both sides must build byte for byte: an enrolled agent asks for a new
TLS certificate by signing these bytes with its Ed25519 key (no token needed)."""

from __future__ import annotations

from .canonical import canonical_json

RENEW_PURPOSE = "renew"  # binds the signature to renewal: no other message of the agent's can be replayed


def renew_message(agent_id: str, csr_pem: str, ts: float) -> bytes:
    return canonical_json({"agent_id": agent_id, "csr": csr_pem, "ts": ts, "purpose": RENEW_PURPOSE})
