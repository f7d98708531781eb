"""Enrolment tokens and the enrolment decision (pure: no I/O; storage in :mod:`store`, transport in
:mod:`enrolserver`).

A token is what an operator hands to a new endpoint once: ``cr1.<id>.<secret>.<ca>``.

* ``id``: 8 hex characters, shown by ``enroll list`` and used by ``enroll revoke``; not secret.
* ``secret``: 32 random bytes, base64url. Only its SHA-256 is stored, so a copy of the database enrols
  nobody; it is compared in constant time.
* ``ca``: the hex SHA-256 of the controller CA certificate's DER. The agent's first contact fetches the CA
  and checks it against this before it trusts the endpoint with its CSR (as kubeadm's discovery hash does):
  no trust on first use, and a token intercepted on its way cannot be replayed against another CA.

A token expires (default 24 h) and is single-use unless created with more uses; every use and every refusal
is audited by the caller with the token id, never the secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from enum import StrEnum

TOKEN_PREFIX = "cr1"  # noqa: S105 - a format tag, not a secret
_TOKEN = re.compile(r"^cr1\.([0-9a-f]{8})\.([A-Za-z0-9_-]{43})\.([0-9a-f]{64})$")
_DURATION = re.compile(r"^(\d{1,6})([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_TOKEN_TTL_S = 30 * 86400
MAX_TOKEN_USES = 10_000


class TokenFormatError(ValueError):
    """Not an enrolment token; the message says what is wrong, never repeating the secret."""


class Refusal(StrEnum):
    UNKNOWN = "unknown_token"
    BAD_SECRET = "bad_secret"  # noqa: S105 - a refusal reason, not a secret
    REVOKED = "token_revoked"
    EXPIRED = "token_expired"
    USED_UP = "token_used_up"


@dataclass(frozen=True, slots=True)
class EnrolmentToken:
    id: str
    secret: str
    ca_fingerprint: str  # hex SHA-256 of the CA certificate's DER

    def __str__(self) -> str:
        return f"{TOKEN_PREFIX}.{self.id}.{self.secret}.{self.ca_fingerprint}"


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """What the controller keeps of a token."""

    id: str
    secret_sha256: str
    site: str
    created_at: float
    expires_at: float
    uses_allowed: int
    uses: int = 0
    revoked_at: float | None = None
    created_by: str = ""


def secret_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def mint(
    ca_fingerprint: str, *, site: str, now: float, ttl_s: float, uses: int, created_by: str
) -> tuple[EnrolmentToken, TokenRecord]:
    """A new token and the record to store (the token itself is shown once and never stored)."""
    if not 0 < ttl_s <= MAX_TOKEN_TTL_S:
        raise ValueError(f"token lifetime must be between 1 s and {MAX_TOKEN_TTL_S // 86400} days")
    if not 1 <= uses <= MAX_TOKEN_USES:
        raise ValueError(f"uses must be between 1 and {MAX_TOKEN_USES}")
    token = EnrolmentToken(
        id=secrets.token_hex(4),
        secret=base64.urlsafe_b64encode(secrets.token_bytes(32)).decode("ascii").rstrip("="),
        ca_fingerprint=ca_fingerprint.removeprefix("sha256:"),
    )
    record = TokenRecord(
        id=token.id,
        secret_sha256=secret_digest(token.secret),
        site=site,
        created_at=now,
        expires_at=now + ttl_s,
        uses_allowed=uses,
        created_by=created_by,
    )
    return token, record


def parse_token(text: str) -> EnrolmentToken:
    match = _TOKEN.match(text.strip())
    if match is None:
        shown = text.strip()[:12] + "…" if len(text.strip()) > 12 else text.strip()
        raise TokenFormatError(
            f"not an enrolment token (expected cr1.<id>.<secret>.<ca sha256>, got {shown!r})"
        )
    return EnrolmentToken(*match.groups())


def refusal(record: TokenRecord | None, secret: str, now: float) -> Refusal | None:
    """Why this token may not enrol now, or None. The secret is checked before anything about the token is
    revealed (a guessed id alone learns nothing)."""
    if record is None:
        return Refusal.UNKNOWN
    if not hmac.compare_digest(record.secret_sha256, secret_digest(secret)):
        return Refusal.BAD_SECRET
    if record.revoked_at is not None:
        return Refusal.REVOKED
    if now >= record.expires_at:
        return Refusal.EXPIRED
    if record.uses >= record.uses_allowed:
        return Refusal.USED_UP
    return None


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``24h``, ``7d`` → seconds."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise ValueError(f"duration {text!r}: expected a number and s, m, h or d (e.g. 24h)")
    return float(int(match.group(1)) * _UNITS[match.group(2)])
