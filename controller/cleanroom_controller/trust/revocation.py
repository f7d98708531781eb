"""``cleanroom-controller agents revoke ID --reason TEXT``: cut a lost or stolen device off in seconds.

The steps, each audited, in this order (field-notes "Revocation on Mosquitto 2.0.11" is why):

1. The agent is marked revoked in the store. The running controller notices within a second: its key cache
   drops the agent's key (every later message of it is refused as ``unknown_sender``) and the endpoint is
   judged in violation ``agent_revoked``, so the policy's actions for a violation apply to its sessions.
2. Every certificate of the device is revoked and the CRL rewritten; the broker's copy is refreshed and the
   broker reloaded (SIGHUP through its pid file). Mosquitto checks the CRL only on new handshakes, so:
3. A short-lived certificate for the device's own identity is issued and used for one connection: with
   ``use_username_as_clientid`` the broker closes the device's connection ("already connected, closing old
   connection"). The device's reconnect then fails the handshake. The take-over certificate is revoked
   right after (a second CRL rewrite and reload), and its key never touches the disk outside a private
   temporary directory.

Only the first step needs the database; the others need the PKI and, for the disconnect, the broker's
configuration directory (``broker_dir``) and address. A missing piece is reported, the steps that can run
do, and the command exits non-zero so the operator knows the device may still be connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt

from cleanroom_protocol import BrokerAddress, tls_context

from ..store import Store
from . import BrokerConfigError, Pki, PkiError, reload_broker, write_crl

TAKEOVER_DAYS = 1 / 24  # one hour: used for a single connection, then revoked
TAKEOVER_TIMEOUT_S = 5.0


@dataclass
class RevocationReport:
    agent: str
    newly_revoked: bool
    serials: list[int] = field(default_factory=list)
    broker_pid: int | None = None
    disconnected: bool = False
    problems: list[str] = field(default_factory=list)


def _audit(store: Store, kind: str, operator: str, agent: str, data: dict[str, object]) -> None:
    with store.transaction():
        store.append_audit(kind, f"operator:{operator}", agent, data)


def revoke_agent(
    *,
    store: Store,
    pki: Pki | None,
    agent: str,
    reason: str,
    operator: str,
    broker_dir: Path | None,
    broker: BrokerAddress | None,
    now: float | None = None,
) -> RevocationReport:
    moment = time.time() if now is None else now
    with store.transaction():
        newly = store.revoke_agent(agent, reason, operator, moment)
        store.append_audit(
            "operator.agents_revoke", f"operator:{operator}", agent, {"reason": reason, "already": not newly}
        )
    report = RevocationReport(agent, newly)
    if pki is None:
        report.problems.append("no PKI in the data directory: no certificate revoked, no disconnect")
        return report
    try:
        report.serials = pki.revoke(agent, reason)
    except (PkiError, OSError) as exc:
        report.problems.append(f"certificates not revoked: {exc}")
        return report
    _audit(
        store,
        "revocation.certificates",
        operator,
        agent,
        {"serials": [format(s, "x") for s in report.serials]},
    )
    if broker_dir is None:
        report.problems.append(
            "no broker_dir set: the broker's CRL was not refreshed; the device stays connected"
        )
        return report
    try:
        write_crl(broker_dir, pki)
        report.broker_pid = reload_broker(broker_dir)
    except (BrokerConfigError, OSError) as exc:
        report.problems.append(f"broker not reloaded: {exc}")
        return report
    _audit(store, "revocation.broker_reloaded", operator, agent, {"pid": report.broker_pid})
    if broker is None or not broker.tls:
        report.problems.append("the controller's broker is not mqtts://: no take-over disconnect")
        return report
    try:
        report.disconnected = take_over(pki, broker, agent)
    except (OSError, PkiError, ValueError) as exc:
        report.problems.append(f"take-over failed: {exc}")
    finally:
        # The take-over certificate is revoked too; the device's are already on the list.
        with contextlib.suppress(PkiError, OSError, BrokerConfigError):
            pki.revoke(agent, f"take-over after revocation: {reason}")
            write_crl(broker_dir, pki)
            reload_broker(broker_dir)
    _audit(store, "revocation.disconnected", operator, agent, {"ok": report.disconnected})
    if not report.disconnected and not report.problems:
        report.problems.append("the broker did not accept the take-over connection in time")
    return report


@contextlib.contextmanager
def _private_files(key_pem: bytes, cert_pem: bytes) -> Iterator[tuple[Path, Path]]:
    with tempfile.TemporaryDirectory(prefix="cleanroom-takeover-") as tmp:  # 0700
        key, cert = Path(tmp) / "key.pem", Path(tmp) / "cert.pem"
        for path, data in ((key, key_pem), (cert, cert_pem)):
            path.touch(mode=0o600)
            path.write_bytes(data)
        yield key, cert


def take_over(pki: Pki, broker: BrokerAddress, agent: str) -> bool:
    """Connect once as ``agent`` with a fresh certificate so that the broker closes the device's own
    connection; True once the broker accepted ours (and with it closed the old one)."""
    key_pem, cert_pem = pki.issue_client_key(agent, days=TAKEOVER_DAYS)
    with _private_files(key_pem, cert_pem) as (key, cert):
        context = tls_context(pki.ca_cert_path, cert, key)

    async def connect_once() -> None:
        async with aiomqtt.Client(
            broker.host,
            broker.port,
            identifier=agent,
            tls_context=context,
            clean_session=True,  # the revoked device's queued session goes with it
            timeout=TAKEOVER_TIMEOUT_S,
        ):
            pass

    try:
        asyncio.run(asyncio.wait_for(connect_once(), TAKEOVER_TIMEOUT_S * 2))
    except (aiomqtt.MqttError, TimeoutError):
        return False
    return True
