"""Certificates and CRLs of the private CA, built in memory: no file, no clock, no randomness hidden in
here (the time, serial and keys come in as arguments), so every rule is testable directly.

Every key is ECDSA P-256 and every signature ECDSA-SHA256: what Mosquitto 2.0 (OpenSSL 3), Python's ``ssl``
and paho all accept, in TLS 1.2 and 1.3 alike. A CSR may carry a P-256/P-384, Ed25519 or RSA (>= 2048 bit)
key; its subject and any extension it asks for are ignored: the CA decides the name and the profile.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cleanroom_protocol.topics import AGENT_ID_PATTERN, is_valid_agent_id

MAX_CSR_BYTES = 16 * 1024
MAX_CLIENT_DAYS = 825.0  # the longest lifetime a client certificate may be given
CA_DAYS = 3650
SERVER_DAYS = 825
BACKDATE = timedelta(minutes=5)  # a device whose clock is a little behind still accepts a new certificate
MIN_RSA_BITS = 2048
MAX_BROKER_HOSTS = 32
ORGANIZATION = "cleanroom"

ClientPublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey


class PkiError(Exception):
    """A certificate request, name or PKI file that cannot be used; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Revoked:
    """One line of the CRL: a revoked certificate's serial and when it was revoked."""

    serial: int
    revoked_at: datetime


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert: x509.Certificate) -> str:
    """``sha256:`` + hex SHA-256 of the certificate's DER (what an enrolment token carries to pin the CA)."""
    return "sha256:" + hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def check_common_name(name: str, what: str = "common name") -> str:
    """A CN becomes the broker username and, through the ACL's ``%u``, one MQTT topic level: it must be a
    valid agent id (no ``/``, ``+``, ``#``, no spaces, at most 64 characters)."""
    if not is_valid_agent_id(name):
        raise PkiError(f"{what} {name!r} is not usable: it must match {AGENT_ID_PATTERN}")
    return name


def check_days(days: float) -> timedelta:
    if not 0 < days <= MAX_CLIENT_DAYS:
        raise PkiError(f"certificate lifetime of {days} days is out of range (0, {MAX_CLIENT_DAYS:g}]")
    return timedelta(days=days)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def build_ca(key: ec.EllipticCurvePrivateKey, *, name: str, now: datetime, serial: int) -> x509.Certificate:
    """A self-signed CA that may sign only end-entity certificates (path length 0) and CRLs."""
    subject = _name(name)
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(serial)
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _end_entity(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    public: ClientPublicKey | ec.EllipticCurvePublicKey,
    *,
    common_name: str,
    usage: x509.ObjectIdentifier,
    now: datetime,
    lifetime: timedelta,
    serial: int,
) -> x509.CertificateBuilder:
    not_after = min(now + lifetime, ca_cert.not_valid_after_utc)  # never outlives its CA
    return (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(serial)
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=isinstance(public, rsa.RSAPublicKey),
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(_ec_public(ca_cert)), critical=False
        )
    )


def _ec_public(cert: x509.Certificate) -> ec.EllipticCurvePublicKey:
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise PkiError("the CA certificate does not hold an ECDSA key")
    return public


def parse_hosts(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """Subject alternative names for the broker: IP addresses as such, everything else as a DNS name."""
    if not hosts:
        raise PkiError("the broker certificate needs at least one host name or address")
    if len(hosts) > MAX_BROKER_HOSTS:
        raise PkiError(f"at most {MAX_BROKER_HOSTS} broker hosts, got {len(hosts)}")
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        labels = host.rstrip(".").split(".")
        if not host or len(host) > 253 or not all(_dns_label(label) for label in labels):
            raise PkiError(f"broker host {host!r} is neither an IP address nor a DNS name")
        names.append(x509.DNSName(host.rstrip(".").lower()))
    return list(dict.fromkeys(names))  # keep the order, drop repeats


def _dns_label(label: str) -> bool:
    return (
        0 < len(label) <= 63
        and label[0] != "-"
        and label[-1] != "-"
        and all(c.isascii() and (c.isalnum() or c == "-") for c in label)
    )


def build_server(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    public: ec.EllipticCurvePublicKey,
    *,
    hosts: Sequence[str],
    now: datetime,
    serial: int,
    days: float = SERVER_DAYS,
) -> x509.Certificate:
    """The broker's TLS server certificate; clients check the host of their broker URL against its SANs."""
    names = parse_hosts(hosts)
    first = names[0].value
    common_name = str(first)[:64]
    builder = _end_entity(
        ca_key,
        ca_cert,
        public,
        common_name=common_name,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        now=now,
        lifetime=timedelta(days=days),
        serial=serial,
    )
    return builder.add_extension(x509.SubjectAlternativeName(names), critical=False).sign(
        ca_key, hashes.SHA256()
    )


def build_client(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    public: ClientPublicKey,
    *,
    common_name: str,
    now: datetime,
    days: float,
    serial: int,
) -> x509.Certificate:
    """A TLS client certificate (clientAuth only) whose CN — the broker username — is ``common_name``."""
    return _end_entity(
        ca_key,
        ca_cert,
        public,
        common_name=check_common_name(common_name),
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        now=now,
        lifetime=check_days(days),
        serial=serial,
    ).sign(ca_key, hashes.SHA256())


def csr_public_key(csr_pem: bytes) -> ClientPublicKey:
    """The public key of a PEM CSR whose self-signature verifies (proof that the requester holds the
    private key); refuses anything oversized, unparsable, badly signed or with a weak or unknown key."""
    if len(csr_pem) > MAX_CSR_BYTES:
        raise PkiError(f"certificate request is {len(csr_pem)} bytes; at most {MAX_CSR_BYTES}")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise PkiError(f"certificate request is not a PEM CSR: {exc}") from None
    try:
        signed = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise PkiError(f"certificate request signature cannot be checked: {exc}") from None
    if not signed:
        raise PkiError("certificate request signature is invalid (not signed by the key it carries)")
    try:
        public = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise PkiError(f"certificate request key is not supported: {exc}") from None
    if isinstance(public, ec.EllipticCurvePublicKey):
        if not isinstance(public.curve, ec.SECP256R1 | ec.SECP384R1):
            raise PkiError(f"certificate request key: curve {public.curve.name} (use P-256 or P-384)")
        return public
    if isinstance(public, rsa.RSAPublicKey):
        if public.key_size < MIN_RSA_BITS:
            raise PkiError(f"certificate request key: RSA {public.key_size} bits (at least {MIN_RSA_BITS})")
        return public
    if isinstance(public, ed25519.Ed25519PublicKey):
        return public
    raise PkiError(f"certificate request key type {type(public).__name__} is not supported")


def build_csr(key: ec.EllipticCurvePrivateKey, common_name: str) -> bytes:
    """A PEM CSR for ``key`` (what a device sends at enrolment; the CA ignores the name in it)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def build_crl(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    revoked: Sequence[Revoked],
    *,
    number: int,
    now: datetime,
    validity: timedelta,
) -> x509.CertificateRevocationList:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - BACKDATE)
        .next_update(now + validity)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(_ec_public(ca_cert)), critical=False
        )
    )
    for entry in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(entry.serial)
            .revocation_date(entry.revoked_at)
            .build()
        )
    return builder.sign(ca_key, hashes.SHA256())


def crl_refresh_due(crl: x509.CertificateRevocationList, now: datetime) -> bool:
    """Re-issue once less than half of the CRL's validity remains: Mosquitto refuses every client once the
    CRL it holds has passed ``nextUpdate``, so the refresh must come long before."""
    next_update = crl.next_update_utc
    if next_update is None:
        return True
    last_update = crl.last_update_utc
    return now >= last_update + (next_update - last_update) / 2


def utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise PkiError("times must be timezone-aware (UTC)")
    return moment.astimezone(UTC)
