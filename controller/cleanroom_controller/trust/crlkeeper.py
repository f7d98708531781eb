"""Keeps the CRL alive: Mosquitto refuses every client once the CRL it holds is past ``nextUpdate``, so the
controller re-issues it when half its validity is gone, and — when the broker runs on this host from a
``broker-config`` directory — copies it there and reloads the broker whenever the CRL changed since the
broker was last reloaded with it (a refresh, a revocation whose own reload failed, and once at start)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509

from .brokerconfig import BrokerFiles, reload_broker, write_crl
from .pki import Pki, utcnow

CHECK_EVERY_S = 60.0


@dataclass(frozen=True, slots=True)
class CrlUpdate:
    """What one check did: re-issued the CRL, and/or handed it to the broker (pid reloaded)."""

    refreshed: bool
    crl_number: int
    revoked: int
    broker_pid: int | None = None


class CrlKeeper:
    def __init__(
        self,
        pki: Pki,
        broker_dir: Path | None,
        *,
        clock: Callable[[], datetime] = utcnow,
        reload: Callable[[Path], int] = reload_broker,
    ) -> None:
        self._pki = pki
        self._broker_dir = broker_dir
        self._clock = clock
        self._reload = reload
        self._handed_over: bytes | None = None  # the CRL the broker was last reloaded with, by us

    def check(self) -> CrlUpdate | None:
        """One check; None when nothing had to change. Raises PkiError / BrokerConfigError / OSError (the
        next check tries again: the broker is reloaded until a reload with the current CRL succeeded)."""
        refreshed = self._pki.refresh_crl_if_due(self._clock())
        current = self._pki.crl_pem()
        pid: int | None = None
        if self._broker_dir is not None and current != self._handed_over:
            # Also once after start: whether the broker ever loaded the copy there is not known.
            try:
                copy = BrokerFiles(self._broker_dir).crl.read_bytes()
            except FileNotFoundError:
                copy = b""
            if copy != current:
                write_crl(self._broker_dir, self._pki)
            pid = self._reload(self._broker_dir)
            self._handed_over = current
        if not refreshed and pid is None:
            return None
        crl = x509.load_pem_x509_crl(current)
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        return CrlUpdate(refreshed=refreshed, crl_number=number, revoked=len(crl), broker_pid=pid)
