"""The issued-certificates index: every certificate the CA signed (serial, CN, role, lifetime, revocation),
so that a device can be revoked by its id and the ACL knows which CNs are controllers. Pure: parsing,
queries and changes here; the file is read and written by :class:`~.pkifiles.PkiFiles`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from .certificates import PkiError

INDEX_VERSION = 1
PRUNE_AFTER = timedelta(days=30)  # an expired certificate is useless; its line goes after this long
MAX_REASON_CHARS = 500


class Role(StrEnum):
    AGENT = "agent"  # a device (or the controller acting as one, e.g. to take a revoked client id over)
    CONTROLLER = "controller"  # a controller process: the ACL's `user` lines
    SERVER = "server"  # the broker


@dataclass(frozen=True, slots=True)
class IssuedCert:
    serial: int
    common_name: str
    role: Role
    not_before: datetime
    not_after: datetime
    revoked_at: datetime | None = None
    reason: str | None = None

    def active(self, now: datetime) -> bool:
        return self.revoked_at is None and self.not_before <= now < self.not_after

    def to_json(self) -> dict[str, Any]:
        return {
            "serial": f"{self.serial:x}",
            "cn": self.common_name,
            "role": self.role.value,
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> IssuedCert:
        revoked = data.get("revoked_at")
        return cls(
            serial=int(data["serial"], 16),
            common_name=str(data["cn"]),
            role=Role(data["role"]),
            not_before=datetime.fromisoformat(data["not_before"]),
            not_after=datetime.fromisoformat(data["not_after"]),
            revoked_at=datetime.fromisoformat(revoked) if revoked else None,
            reason=data.get("reason"),
        )


@dataclass(frozen=True, slots=True)
class Index:
    controller_id: str
    crl_number: int = 0
    certs: tuple[IssuedCert, ...] = field(default_factory=tuple)

    # -- queries ------------------------------------------------------------------------------------
    def role_of(self, common_name: str, now: datetime) -> Role | None:
        """The role this CN holds through a certificate that is not expired (revoked ones count too: a
        revoked controller name must not be re-used for a device, whose CN would then match ACL lines)."""
        for cert in self.certs:
            if cert.common_name == common_name and cert.not_after > now and cert.role is not Role.SERVER:
                return cert.role
        return None

    def controllers(self, now: datetime) -> list[str]:
        """CNs of controllers with a usable certificate (sorted, once each)."""
        return sorted({c.common_name for c in self.certs if c.role is Role.CONTROLLER and c.active(now)})

    def revoked(self, now: datetime) -> list[IssuedCert]:
        """Revoked certificates not yet expired: what the CRL must list."""
        return [c for c in self.certs if c.revoked_at is not None and c.not_after > now]

    def find(self, serial: int) -> IssuedCert | None:
        return next((c for c in self.certs if c.serial == serial), None)

    # -- changes (each returns a new index) ---------------------------------------------------------
    def with_cert(self, cert: IssuedCert, now: datetime) -> Index:
        kept = tuple(c for c in self.certs if c.not_after > now - PRUNE_AFTER)
        return replace(self, certs=(*kept, cert))

    def with_revoked(self, common_name: str, reason: str, now: datetime) -> tuple[Index, list[int]]:
        """Revoke every unexpired, not yet revoked certificate of ``common_name``."""
        reason = reason.strip()[:MAX_REASON_CHARS] or "unspecified"
        serials: list[int] = []
        certs: list[IssuedCert] = []
        for cert in self.certs:
            if cert.common_name == common_name and cert.revoked_at is None and cert.not_after > now:
                cert = replace(cert, revoked_at=now, reason=reason)
                serials.append(cert.serial)
            certs.append(cert)
        return replace(self, certs=tuple(certs)), serials

    def next_crl(self) -> Index:
        return replace(self, crl_number=self.crl_number + 1)

    # -- encoding -----------------------------------------------------------------------------------
    def dumps(self) -> bytes:
        doc = {
            "version": INDEX_VERSION,
            "controller_id": self.controller_id,
            "crl_number": self.crl_number,
            "certificates": [c.to_json() for c in self.certs],
        }
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def loads(cls, raw: bytes, *, source: str) -> Index:
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("version") != INDEX_VERSION:
                raise ValueError(f"not a version {INDEX_VERSION} index")
            return cls(
                controller_id=str(doc["controller_id"]),
                crl_number=int(doc["crl_number"]),
                certs=tuple(IssuedCert.from_json(c) for c in doc["certificates"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise PkiError(f"{source}: issued-certificates index is unreadable: {exc}") from None
