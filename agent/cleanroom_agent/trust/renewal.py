"""The enrolled agent's certificate renewal: at two thirds of its lifetime, a new certificate from the
controller's enrolment endpoint, proven with the agent's Ed25519 key (no token; see enroll.py and
docs/trust.md). The new certificate is written in place; the link builds its TLS context at every
connection, so the next reconnect uses it, and the current connection stays up until then.

A failed renewal is retried every ``RETRY_S`` and reported as an event; the certificate in use stays valid
until its end, a third of its lifetime later (30 days with the default 90)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cleanroom_protocol import Severity

from ..messaging.reporting import EventSink
from .enroll import EnrolmentError, certificate_window, renew_certificate, renewal_due

log = structlog.get_logger("cleanroom_agent.trust.renewal")

RETRY_S = 600.0
MAX_SLEEP_S = 3600.0  # re-read the certificate at least hourly (an operator may have replaced it)


class CertificateRenewer:
    def __init__(
        self,
        *,
        agent_id: str,
        data_dir: Path,
        cert_path: Path,
        controller_url: str,
        key: Ed25519PrivateKey,
        events: EventSink,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._agent_id = agent_id
        self._data_dir = data_dir
        self._cert_path = cert_path
        self._controller_url = controller_url
        self._key = key
        self._events = events
        self._clock = clock

    def seconds_until_due(self) -> float:
        not_before, not_after = certificate_window(self._cert_path)
        now = self._clock()
        if renewal_due(not_before, not_after, now):
            return 0.0
        return not_before + (not_after - not_before) * 2 / 3 - now

    async def renew_once(self) -> bool:
        try:
            done = await asyncio.to_thread(
                renew_certificate, self._controller_url, self._agent_id, self._data_dir, self._key
            )
        except (EnrolmentError, OSError, ValueError) as exc:
            log.warning("certificate_renewal_failed", error=str(exc))
            self._events.event(
                "certificate.renewal_failed", Severity.WARNING, error=str(exc)[:500], retry_in_s=RETRY_S
            )
            return False
        log.info("certificate_renewed", not_after=done.certificate_not_after)
        self._events.event("certificate.renewed", not_after=done.certificate_not_after)
        return True

    async def run(self) -> None:
        while True:
            try:
                wait = self.seconds_until_due()
            except (OSError, ValueError) as exc:
                log.error("certificate_unreadable", path=str(self._cert_path), error=str(exc))
                wait = RETRY_S
            else:
                if wait <= 0:
                    wait = 0.0 if await self.renew_once() else RETRY_S
            await asyncio.sleep(min(max(wait, 1.0), MAX_SLEEP_S))
