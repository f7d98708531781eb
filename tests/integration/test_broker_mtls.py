"""The broker as `broker-config` writes it, run for real: only certificates from the controller's CA get
in, a revoked one is shut out after the CRL rewrite and a reload, every device speaks and reads only for
itself, no device can take another's client id, and the controller reads and writes what it must.

Mosquitto runs from the generated files exactly as in production: started as root it drops to the
`mosquitto` user, so the files must be readable by that user (the test fails if they are not)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
import pytest

from cleanroom_controller.trust import (
    BrokerFiles,
    Listen,
    Pki,
    build_csr,
    reload_broker,
    write_broker_config,
    write_crl,
)
from cleanroom_controller.trust.certificates import cert_pem, key_pem, new_key
from cleanroom_protocol import tls_context
from tests.support.mosquitto import Mosquitto, free_port
from tests.support.mqttprobe import Answer, probe
from tests.support.procs import cleanroom
from tests.support.wait import async_wait_for, wait_for

pytestmark = pytest.mark.integration

AGENTS = "cleanroom/v1/agents"


@dataclass
class MtlsBroker:
    pki: Pki
    broker: Mosquitto
    files: BrokerFiles
    certs: Path
    _issued: int = 0

    @property
    def port(self) -> int:
        return self.broker.port

    def write_client(self, common_name: str, *, pki: Pki | None = None) -> tuple[Path, Path]:
        """A key and a certificate for ``common_name`` from ``pki`` (default: the broker's CA), on disk."""
        key, cert = (pki or self.pki).issue_client_key(common_name)
        self._issued += 1
        key_path = self.certs / f"{common_name}-{self._issued}.key"
        cert_path = key_path.with_suffix(".crt")
        key_path.touch(mode=0o600)
        key_path.write_bytes(key)
        cert_path.write_bytes(cert)
        return cert_path, key_path

    def client_tls(self, common_name: str, *, pki: Pki | None = None) -> ssl.SSLContext:
        """TLS as a device ``common_name`` (trusting the broker's real CA, whoever issued the client cert)."""
        cert, key = self.write_client(common_name, pki=pki)
        return tls_context(self.pki.ca_cert_path, cert, key)

    def controller_tls(self) -> ssl.SSLContext:
        return tls_context(self.pki.ca_cert_path, self.pki.controller_cert_path, self.pki.controller_key_path)

    def client(self, ctx: ssl.SSLContext, identifier: str) -> aiomqtt.Client:
        return aiomqtt.Client("127.0.0.1", self.port, identifier=identifier, tls_context=ctx, timeout=5)


@contextlib.contextmanager
def mtls_broker(data_dir: Path, work: Path) -> Iterator[MtlsBroker]:
    pki = Pki.init(data_dir)
    # The broker's directory must be reachable by the `mosquitto` user: pytest's tmp_path is not (0700).
    root = Path(tempfile.mkdtemp(prefix="cr-mtls-"))
    root.chmod(0o711)
    port = free_port()
    files = write_broker_config(root / "broker", pki, listen=Listen("127.0.0.1", port))
    broker = Mosquitto(work / "mosquitto", port=port, config=files.conf)
    certs = work / "certs"
    certs.mkdir(parents=True, mode=0o700)
    try:
        broker.start()
        yield MtlsBroker(pki, broker, files, certs)
    finally:
        broker.stop()
        print(f"===== mosquitto log =====\n{broker.log_text()[-4000:]}")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def mtls(tmp_path: Path) -> Iterator[MtlsBroker]:
    with mtls_broker(tmp_path / "controller", tmp_path) as world:
        yield world


@dataclass
class Inbox:
    """Everything one client receives, read by a background task."""

    client: aiomqtt.Client
    got: list[tuple[str, bytes]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        async for message in self.client.messages:
            payload = message.payload
            self.got.append((str(message.topic), bytes(payload) if isinstance(payload, bytes) else b""))

    def start(self) -> Inbox:
        self.task = asyncio.get_running_loop().create_task(self._read())
        return self

    async def wait(self, topic: str, payload: bytes, timeout: float = 5.0) -> None:
        async def seen() -> bool:
            return (topic, payload) in self.got

        await async_wait_for(seen, timeout=timeout, what=f"{payload!r} on {topic}")

    def topics_with(self, payload: bytes) -> list[str]:
        return [t for t, p in self.got if p == payload]

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self.task


@contextlib.asynccontextmanager
async def connected(client: aiomqtt.Client) -> AsyncIterator[Inbox]:
    async with client:
        inbox = Inbox(client).start()
        try:
            yield inbox
        finally:
            await inbox.stop()


# -- who gets in ------------------------------------------------------------------------------------


def test_plain_tcp_client_is_refused(mtls: MtlsBroker) -> None:
    answer = probe(mtls.port, None, "plain")
    assert not answer.admitted, answer


def test_tls_client_without_certificate_is_refused(mtls: MtlsBroker) -> None:
    answer = probe(mtls.port, tls_context(mtls.pki.ca_cert_path, None, None), "anonymous")
    assert not answer.admitted, answer


def test_certificate_from_another_ca_is_refused(mtls: MtlsBroker, tmp_path: Path) -> None:
    other = Pki.init(tmp_path / "other-controller")
    ctx = mtls.client_tls("agent-a", pki=other)  # trusts the real broker: only the client side is wrong
    answer = probe(mtls.port, ctx, "agent-a")
    assert not answer.admitted, answer


def test_certificate_issued_by_the_pki_is_admitted(mtls: MtlsBroker) -> None:
    answer = probe(mtls.port, mtls.client_tls("agent-a"), "agent-a")
    assert answer.admitted, answer


def test_client_checks_the_broker_name_against_its_certificate(mtls: MtlsBroker) -> None:
    answer = probe(mtls.port, mtls.client_tls("agent-a"), "agent-a", server_hostname="broker.elsewhere")
    assert not answer.admitted and "handshake failed" in answer.detail, answer


def test_revoked_certificate_is_refused_after_crl_rewrite_and_reload(mtls: MtlsBroker) -> None:
    cert_a, key_a = mtls.write_client("agent-a")
    ctx_a = tls_context(mtls.pki.ca_cert_path, cert_a, key_a)
    ctx_b = mtls.client_tls("agent-b")
    assert probe(mtls.port, ctx_a, "agent-a").admitted

    started = time.monotonic()
    serials = mtls.pki.revoke("agent-a", "laptop stolen")
    write_crl(mtls.files.out, mtls.pki)
    assert reload_broker(mtls.files.out) == mtls.broker.proc.pid  # type: ignore[union-attr]

    def refused() -> Answer | None:
        answer = probe(mtls.port, ctx_a, "agent-a")
        return None if answer.admitted else answer

    answer = wait_for(refused, timeout=5, what="the revoked certificate to be refused")
    print(f"revoked → refused in {time.monotonic() - started:.3f} s ({answer.detail})")

    from cryptography import x509

    assert serials == [x509.load_pem_x509_certificate(cert_a.read_bytes()).serial_number]
    assert probe(mtls.port, ctx_b, "agent-b").admitted, "another device stays admitted"


# -- what each may do -------------------------------------------------------------------------------


async def test_agent_cannot_publish_as_another_agent(mtls: MtlsBroker) -> None:
    async with (
        connected(mtls.client(mtls.controller_tls(), "controller")) as controller,
        connected(mtls.client(mtls.client_tls("agent-a"), "agent-a")) as agent_a,
    ):
        await controller.client.subscribe(f"{AGENTS}/+/+", qos=1)
        await controller.client.subscribe("cleanroom/v1/policy", qos=1)
        for channel in ("posture", "events", "status", "acks"):
            await agent_a.client.publish(f"{AGENTS}/agent-b/{channel}", b"forged", qos=1)
        await agent_a.client.publish("cleanroom/v1/policy", b"forged", qos=1)
        # The broker keeps one publisher's order: once this arrives, anything before it would have.
        await agent_a.client.publish(f"{AGENTS}/agent-a/posture", b"sentinel", qos=1)
        await controller.wait(f"{AGENTS}/agent-a/posture", b"sentinel")
        assert controller.topics_with(b"forged") == []


async def test_agent_cannot_write_commands(mtls: MtlsBroker) -> None:
    async with (
        connected(mtls.client(mtls.client_tls("agent-a"), "agent-a")) as agent_a,
        connected(mtls.client(mtls.client_tls("agent-b"), "agent-b")) as agent_b,
    ):
        await agent_b.client.subscribe(f"{AGENTS}/agent-b/commands", qos=1)
        await agent_a.client.subscribe(f"{AGENTS}/agent-a/commands", qos=1)
        await agent_a.client.publish(f"{AGENTS}/agent-b/commands", b"forged", qos=1)
        await agent_a.client.publish(f"{AGENTS}/agent-a/commands", b"forged-own", qos=1)
        async with connected(mtls.client(mtls.controller_tls(), "controller")) as controller:
            await controller.client.publish(f"{AGENTS}/agent-b/commands", b"sentinel", qos=1)
            await controller.client.publish(f"{AGENTS}/agent-a/commands", b"sentinel", qos=1)
        await agent_b.wait(f"{AGENTS}/agent-b/commands", b"sentinel")
        await agent_a.wait(f"{AGENTS}/agent-a/commands", b"sentinel")
        assert agent_b.topics_with(b"forged") == []
        assert agent_a.topics_with(b"forged-own") == []


async def test_agent_reads_only_its_own_commands(mtls: MtlsBroker) -> None:
    async with (
        connected(mtls.client(mtls.client_tls("agent-b"), "agent-b")) as agent_b,
        connected(mtls.client(mtls.controller_tls(), "controller")) as controller,
    ):
        await agent_b.client.subscribe(f"{AGENTS}/+/commands", qos=1)  # granted, but filtered by the ACL
        await agent_b.client.subscribe(f"{AGENTS}/+/posture", qos=1)
        async with connected(mtls.client(mtls.client_tls("agent-a"), "agent-a")) as agent_a:
            await agent_a.client.publish(f"{AGENTS}/agent-a/posture", b"secret", qos=1)
        await controller.client.publish(f"{AGENTS}/agent-a/commands", b"secret", qos=1)
        await controller.client.publish(f"{AGENTS}/agent-b/commands", b"sentinel", qos=1)
        await agent_b.wait(f"{AGENTS}/agent-b/commands", b"sentinel")
        assert agent_b.topics_with(b"secret") == []


async def test_second_client_with_another_certificate_cannot_take_over_a_client_id(
    mtls: MtlsBroker,
) -> None:
    async with (
        connected(mtls.client(mtls.controller_tls(), "controller")) as controller,
        connected(mtls.client(mtls.client_tls("agent-a"), "agent-a")) as agent_a,
    ):
        await controller.client.subscribe(f"{AGENTS}/+/posture", qos=1)
        impostor = probe(mtls.port, mtls.client_tls("agent-b"), "agent-a")  # asks for A's client id
        assert impostor.admitted, impostor  # admitted, but as agent-b:
        wait_for(
            lambda: "as agent-b (" in mtls.broker.log_text(),
            timeout=5,
            what="the broker to name the client by its certificate",
        )
        # A's connection survived: its next publish is acknowledged and delivered.
        await agent_a.client.publish(f"{AGENTS}/agent-a/posture", b"still-here", qos=1)
        await controller.wait(f"{AGENTS}/agent-a/posture", b"still-here")
        assert agent_a.task is not None and not agent_a.task.done()


async def test_fresh_certificate_with_the_same_cn_takes_the_client_id_over(mtls: MtlsBroker) -> None:
    """What revocation relies on to cut a connected device off: Mosquitto checks the CRL only at the
    handshake, but a new connection with a fresh certificate for the same CN (the controller is the CA)
    takes the client id over and Mosquitto closes the device's connection."""
    async with connected(mtls.client(mtls.client_tls("agent-a"), "agent-a")) as agent_a:
        assert probe(mtls.port, mtls.client_tls("agent-a"), "whatever").admitted

        async def closed() -> bool:
            return agent_a.task is not None and agent_a.task.done()

        await async_wait_for(closed, timeout=5, what="the device's connection to be closed")
        with pytest.raises(aiomqtt.MqttError):
            agent_a.task.result()  # type: ignore[union-attr]


async def test_controller_reads_agent_topics_and_writes_commands_and_policy(mtls: MtlsBroker) -> None:
    async with (
        connected(mtls.client(mtls.controller_tls(), "controller")) as controller,
        connected(mtls.client(mtls.client_tls("agent-a"), "agent-a")) as agent_a,
    ):
        for channel in ("posture", "events", "status", "acks"):  # as `--share-group ingest` subscribes
            await controller.client.subscribe(f"$share/ingest/{AGENTS}/+/{channel}", qos=1)
        await agent_a.client.subscribe(f"{AGENTS}/agent-a/commands", qos=1)
        await agent_a.client.subscribe("cleanroom/v1/policy", qos=1)
        for channel in ("posture", "events", "status", "acks"):
            await agent_a.client.publish(f"{AGENTS}/agent-a/{channel}", channel.encode(), qos=1)
        for channel in ("posture", "events", "status", "acks"):
            await controller.wait(f"{AGENTS}/agent-a/{channel}", channel.encode())
        await controller.client.publish(f"{AGENTS}/agent-a/commands", b"end_session", qos=1)
        await controller.client.publish("cleanroom/v1/policy", b"policy", qos=1, retain=True)
        await agent_a.wait(f"{AGENTS}/agent-a/commands", b"end_session")
        await agent_a.wait("cleanroom/v1/policy", b"policy")


def test_broker_files_readable_only_by_the_broker(mtls: MtlsBroker) -> None:
    """The key copy is not world-readable; Mosquitto (dropped to its user) still read it: it admits."""
    mode = mtls.files.key.stat().st_mode & 0o777
    assert mode & 0o007 == 0, oct(mode)
    assert probe(mtls.port, mtls.client_tls("agent-a"), "agent-a").admitted


# -- the real processes -----------------------------------------------------------------------------


def test_controller_and_agent_processes_connect_over_mtls(tmp_path: Path) -> None:
    """`cleanroom-controller run` and `cleanroom-agent run` with certificates from the PKI (the agent's
    from a CSR, its key never leaving its data dir): the agent shows up online, and the controller hands
    the CRL to the broker on this host (reload by pid file)."""
    with (
        mtls_broker(tmp_path / "cleanroom" / "controller", tmp_path) as world,
        cleanroom(tmp_path, world.broker) as cr,
    ):
        pki = world.pki
        cr.start_controller(
            "--tls-ca", str(pki.ca_cert_path),
            "--tls-cert", str(pki.controller_cert_path),
            "--tls-key", str(pki.controller_key_path),
            "--broker-dir", str(world.files.out),
        )  # fmt: skip
        tls_dir = tmp_path / "agent-tls"
        tls_dir.mkdir(mode=0o700)
        key = new_key()
        (tls_dir / "agent.key").touch(mode=0o600)
        (tls_dir / "agent.key").write_bytes(key_pem(key))
        cert = pki.issue_client(build_csr(key, "whatever-it-asks"), common_name="it-agent")
        (tls_dir / "agent.crt").write_bytes(cert_pem(cert))
        cr.add_agent(
            "it-agent",
            extra=[
                "--tls-ca", str(pki.ca_cert_path),
                "--tls-cert", str(tls_dir / "agent.crt"),
                "--tls-key", str(tls_dir / "agent.key"),
            ],
        )  # fmt: skip
        cr.wait_agent("it-agent", timeout=30, what="the agent online over mTLS", online=True)
        assert cr.controller is not None
        controller = cr.controller
        wait_for(
            lambda: "crl_published" in controller.log_text(),
            timeout=10,
            what="the controller to hand the CRL to the broker",
        )
        assert "as it-agent (" in world.broker.log_text()
