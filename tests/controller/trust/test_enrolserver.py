"""Enrolment end to end over real HTTPS: the controller's real endpoint (uvicorn, the PKI's server
certificate) and the agent's real `enroll` code, a real PKI and a real SQLite store in temp dirs."""

from __future__ import annotations

import asyncio
import base64
import json
import stat
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from cleanroom_agent.trust.enroll import EnrolmentError, enroll, renew_certificate
from cleanroom_controller.store import Store
from cleanroom_controller.trust import Pki
from cleanroom_controller.trust.enrolment import mint
from cleanroom_controller.trust.enrolserver import (
    EnrolmentServer,
    EnrolmentService,
    EnrolmentSettings,
    build_app,
)
from cleanroom_protocol import load_private_key, public_key_pem
from tests.support.mosquitto import free_port


@dataclass
class Endpoint:
    url: str
    pki: Pki
    store: Store
    service: EnrolmentService

    def token(self, *, uses: int = 1, ttl_s: float = 3600) -> str:
        token, record = mint(self.pki.ca_fingerprint, site="test", now=time.time(), ttl_s=ttl_s, uses=uses,
                             created_by="test")  # fmt: skip
        self.store.add_token(record)
        return str(token)

    def audit(self, kind: str) -> list[dict[str, object]]:
        return [e.data for e in self.store.audit_entries() if e.kind == kind]


@pytest.fixture
async def endpoint(tmp_path: Path) -> AsyncIterator[Endpoint]:
    data = tmp_path / "controller"
    pki = Pki.init(data, broker_hosts=["localhost", "127.0.0.1"])
    store = Store.open(data)
    controller_key = Ed25519PrivateKey.generate()
    service = EnrolmentService(
        store, pki, EnrolmentSettings("controller", public_key_pem(controller_key), "mqtts://localhost:8883")
    )
    port = free_port()
    server = EnrolmentServer(
        build_app(service),
        host="127.0.0.1",
        port=port,
        certfile=str(pki.server_cert_path),
        keyfile=str(pki.server_key_path),
    )
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 10
    while not server.started:
        assert not task.done(), task
        assert time.monotonic() < deadline, "the enrolment endpoint did not start"
        await asyncio.sleep(0.02)
    yield Endpoint(f"https://localhost:{port}", pki, store, service)
    server.request_stop()
    await asyncio.wait_for(task, 10)
    store.close()


async def agent_enroll(endpoint: Endpoint, token: str, agent_dir: Path, agent_id: str = "ep-1") -> object:
    return await asyncio.to_thread(enroll, endpoint.url, token, agent_id, agent_dir, agent_dir / "agent.key")


async def test_a_token_enrols_once_and_every_file_is_private(endpoint: Endpoint, tmp_path: Path) -> None:
    token = endpoint.token()
    agent_dir = tmp_path / "agent"
    await agent_enroll(endpoint, token, agent_dir)
    cert = x509.load_pem_x509_certificate((agent_dir / "tls" / "agent.crt").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "ep-1"
    assert cert.issuer == endpoint.pki.ca_cert.subject
    for path in (agent_dir / "tls").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE((agent_dir / "tls").stat().st_mode) == 0o700
    assert json.loads((agent_dir / "enrolment.json").read_text())["broker_url"] == "mqtts://localhost:8883"
    key = load_private_key(agent_dir / "agent.key")
    assert endpoint.store.public_key_pem("ep-1") == public_key_pem(key)  # no key copied by hand
    # a single-use token refuses its second use, and the refusal is audited without the secret
    with pytest.raises(EnrolmentError, match="token_used_up"):
        await agent_enroll(endpoint, token, tmp_path / "second", "ep-2")
    refused = endpoint.audit("enrol.refused")
    assert [r["reason"] for r in refused] == ["token_used_up"]
    secret = token.split(".")[2]
    assert all(secret not in json.dumps(e.data) for e in endpoint.store.audit_entries())
    assert [a["token"] for a in endpoint.audit("enrol.accepted")] == [token.split(".")[1]]


async def test_an_expired_or_revoked_token_is_refused(endpoint: Endpoint, tmp_path: Path) -> None:
    expiring = endpoint.token(ttl_s=1)
    await asyncio.sleep(1.1)
    with pytest.raises(EnrolmentError, match="token_expired"):
        await agent_enroll(endpoint, expiring, tmp_path / "a")
    revoked = endpoint.token()
    assert endpoint.store.revoke_token(revoked.split(".")[1], time.time())
    with pytest.raises(EnrolmentError, match="token_revoked"):
        await agent_enroll(endpoint, revoked, tmp_path / "b")
    assert endpoint.store.public_key_pem("ep-1") is None


async def test_a_token_pinning_another_ca_sends_nothing(endpoint: Endpoint, tmp_path: Path) -> None:
    """The agent refuses a controller whose CA is not the token's before it sends the token."""
    token = endpoint.token()
    parts = token.split(".")
    forged_pin = ".".join([*parts[:3], "0" * 64])
    with pytest.raises(EnrolmentError, match="not the sha256:0000"):
        await agent_enroll(endpoint, forged_pin, tmp_path / "a")
    assert endpoint.audit("enrol.refused") == [] and endpoint.audit("enrol.accepted") == []
    await agent_enroll(endpoint, token, tmp_path / "b")  # the token was never spent


async def test_renewal_with_the_enrolled_key_and_no_token(endpoint: Endpoint, tmp_path: Path) -> None:
    agent_dir = tmp_path / "agent"
    await agent_enroll(endpoint, endpoint.token(), agent_dir)
    before = x509.load_pem_x509_certificate((agent_dir / "tls" / "agent.crt").read_bytes())
    key = load_private_key(agent_dir / "agent.key")
    await asyncio.to_thread(renew_certificate, endpoint.url, "ep-1", agent_dir, key)
    after = x509.load_pem_x509_certificate((agent_dir / "tls" / "agent.crt").read_bytes())
    assert after.serial_number != before.serial_number
    assert [r["certificate_serial"] for r in endpoint.audit("renew.accepted")] == [
        format(after.serial_number, "x")
    ]
    # another key cannot renew in ep-1's name
    with pytest.raises(EnrolmentError, match="bad signature"):
        await asyncio.to_thread(
            renew_certificate, endpoint.url, "ep-1", agent_dir, Ed25519PrivateKey.generate()
        )
    # a revoked agent cannot renew
    endpoint.store.revoke_agent("ep-1", "lost", "test", time.time())
    with pytest.raises(EnrolmentError, match="agent is revoked"):
        await asyncio.to_thread(renew_certificate, endpoint.url, "ep-1", agent_dir, key)


async def test_a_replayed_renewal_is_refused(endpoint: Endpoint, tmp_path: Path) -> None:
    agent_dir = tmp_path / "agent"
    await agent_enroll(endpoint, endpoint.token(), agent_dir)
    key = load_private_key(agent_dir / "agent.key")
    csr = "-----BEGIN CERTIFICATE REQUEST-----\n"  # irrelevant: the replay is refused before the CSR
    ts = time.time()
    from cleanroom_protocol import renew_message

    body = {
        "agent_id": "ep-1",
        "csr": csr,
        "ts": ts,
        "sig": base64.b64encode(key.sign(renew_message("ep-1", csr, ts))).decode(),
    }
    endpoint.store.set_meta("renewed_ts:ep-1", repr(ts))
    status, answer = endpoint.service.renew(body, "test")
    assert (status, answer["error"]) == (403, "renewal refused: replayed request")


class RecordedEvents:
    """The renewer's event sink, recorded (the agent's EventSink queues into its outbox)."""

    def __init__(self) -> None:
        self.kinds: list[str] = []

    def event(self, kind: str, *_: object, **__: object) -> None:
        self.kinds.append(kind)


async def test_the_agent_renews_at_two_thirds_of_its_certificates_lifetime(
    endpoint: Endpoint, tmp_path: Path
) -> None:
    from cleanroom_agent.trust.renewal import CertificateRenewer

    agent_dir = tmp_path / "agent"
    await agent_enroll(endpoint, endpoint.token(), agent_dir)
    cert_path = agent_dir / "tls" / "agent.crt"
    first = x509.load_pem_x509_certificate(cert_path.read_bytes())
    start, end = first.not_valid_before_utc.timestamp(), first.not_valid_after_utc.timestamp()
    now = [start + (end - start) * 0.6]
    events = RecordedEvents()
    renewer = CertificateRenewer(
        agent_id="ep-1", data_dir=agent_dir, cert_path=cert_path, controller_url=endpoint.url,
        key=load_private_key(agent_dir / "agent.key"), events=events, clock=lambda: now[0],  # type: ignore[arg-type]
    )  # fmt: skip
    assert renewer.seconds_until_due() > 0  # at 60 %: not yet
    now[0] = start + (end - start) * 0.67
    assert renewer.seconds_until_due() == 0
    assert await renewer.renew_once()
    renewed = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert renewed.serial_number != first.serial_number and events.kinds == ["certificate.renewed"]
