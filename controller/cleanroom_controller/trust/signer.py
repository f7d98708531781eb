"""Signs what the controller sends: allocates the next durable seq, then seals (seq before signature)."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel

from cleanroom_protocol import Kind, seal

from ..store import Store


class Signer:
    def __init__(self, store: Store, key: Ed25519PrivateKey, sender: str) -> None:
        self._store = store
        self._key = key
        self.sender = sender

    def seal(self, kind: Kind, body: BaseModel) -> tuple[int, bytes]:
        seq = self._store.next_seq()
        return seq, seal(kind, body, sender=self.sender, seq=seq, key=self._key)
