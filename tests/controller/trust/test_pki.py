"""The private CA: what it signs, what it refuses, what it revokes, and the files it keeps."""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cleanroom_controller.trust import CRL_VALIDITY, IssuedCert, Pki, PkiError, Role, build_csr, fingerprint
from cleanroom_controller.trust.certificates import csr_public_key, new_key, parse_hosts

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def common_name(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def revoked_serials(pki: Pki) -> set[int]:
    return {entry.serial_number for entry in pki.crl()}


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.init(tmp_path / "ctl", broker_hosts=["broker.example", "10.1.2.3"], now=NOW)


# -- init and load ----------------------------------------------------------------------------------


def test_init_writes_keys_0600_in_a_0700_directory(pki: Pki) -> None:
    assert stat.S_IMODE(pki.root.stat().st_mode) == 0o700
    for key in (pki.files.ca_key, pki.server_key_path, pki.controller_key_path, pki.files.index):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    for public in (pki.ca_cert_path, pki.server_cert_path, pki.controller_cert_path, pki.crl_path):
        assert public.exists(), public


def test_init_refuses_to_replace_an_existing_ca(pki: Pki, tmp_path: Path) -> None:
    before = pki.ca_pem
    with pytest.raises(PkiError, match="already exists"):
        Pki.init(tmp_path / "ctl")
    assert Pki.load(tmp_path / "ctl").ca_pem == before
    assert not [p for p in (tmp_path / "ctl").iterdir() if p.name.startswith(".pki")]  # no leftovers


def test_load_gives_the_same_ca_and_fingerprint(pki: Pki, tmp_path: Path) -> None:
    loaded = Pki.load(tmp_path / "ctl")
    assert loaded.ca_pem == pki.ca_pem
    assert loaded.ca_fingerprint == fingerprint(pki.ca_cert)
    assert pki.ca_fingerprint.startswith("sha256:") and len(pki.ca_fingerprint) == 7 + 64


def test_load_refuses_a_ca_key_readable_by_others(pki: Pki, tmp_path: Path) -> None:
    os.chmod(pki.files.ca_key, 0o644)
    with pytest.raises(PkiError, match="0644"):
        Pki.load(tmp_path / "ctl")


def test_load_without_pki_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="pki init"):
        Pki.load(tmp_path / "nothing")


def test_ca_signs_only_end_entities(pki: Pki) -> None:
    constraints = pki.ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    assert isinstance(pki.ca_cert.public_key(), ec.EllipticCurvePublicKey)


def test_server_certificate_names_the_broker_hosts(pki: Pki) -> None:
    server = pki.server_cert()
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["broker.example"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    server.verify_directly_issued_by(pki.ca_cert)


def test_bad_broker_host_is_refused() -> None:
    with pytest.raises(PkiError, match="neither an IP address nor a DNS name"):
        parse_hosts(["bad host/name"])


def test_controller_certificate_has_the_controller_id(pki: Pki) -> None:
    cert = x509.load_pem_x509_certificate(pki.controller_cert_path.read_bytes())
    assert common_name(cert) == "controller"
    assert pki.controllers(NOW) == ["controller"]


# -- issuing ----------------------------------------------------------------------------------------


def test_common_name_comes_from_the_ca_not_the_csr(pki: Pki) -> None:
    key = new_key()
    cert = pki.issue_client(build_csr(key, "controller"), common_name="tc-0042", now=NOW)
    assert common_name(cert) == "tc-0042"
    assert cert.public_key() == key.public_key()
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    cert.verify_directly_issued_by(pki.ca_cert)


def test_extensions_the_csr_asks_for_are_ignored(pki: Pki) -> None:
    key = new_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("broker.example")]), critical=False)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    cert = pki.issue_client(csr, common_name="tc-1", now=NOW)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_csr_with_a_bad_signature_is_refused(pki: Pki) -> None:
    honest = build_csr(new_key(), "tc-0042")
    der = bytearray(x509.load_pem_x509_csr(honest).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the signature: the request no longer proves the key
    forged = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(PkiError, match="signature"):
        pki.issue_client(forged, common_name="tc-0042", now=NOW)
    assert pki.issued("tc-0042") == []


def test_csr_that_is_not_pem_or_too_large_is_refused(pki: Pki) -> None:
    with pytest.raises(PkiError, match="not a PEM CSR"):
        pki.issue_client(b"hello", common_name="tc-1")
    with pytest.raises(PkiError, match="bytes; at most"):
        pki.issue_client(b"x" * 100_000, common_name="tc-1")


def test_csr_key_on_another_curve_is_refused() -> None:
    with pytest.raises(PkiError, match="curve secp521r1"):
        csr_public_key(build_csr(ec.generate_private_key(ec.SECP521R1()), "x"))


def test_ed25519_csr_is_accepted(pki: Pki) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .sign(key, None)
        .public_bytes(serialization.Encoding.PEM)
    )
    assert common_name(pki.issue_client(csr, common_name="tc-ed", now=NOW)) == "tc-ed"


@pytest.mark.parametrize("name", ["a/b", "+", "#", "", "x" * 65, "with space"])
def test_common_name_unusable_as_a_topic_level_is_refused(pki: Pki, name: str) -> None:
    with pytest.raises(PkiError, match="not usable"):
        pki.issue_client(build_csr(new_key(), "x"), common_name=name)


def test_a_device_cannot_be_given_a_controllers_name(pki: Pki) -> None:
    with pytest.raises(PkiError, match="controller's name"):
        pki.issue_client(build_csr(new_key(), "x"), common_name="controller", now=NOW)


def test_a_controller_cannot_be_given_a_devices_name(pki: Pki) -> None:
    pki.issue_client(build_csr(new_key(), "x"), common_name="tc-1", now=NOW)
    with pytest.raises(PkiError, match="device's name"):
        pki.issue_controller("tc-1", now=NOW)


def test_extra_controller_certificates_join_the_controllers(pki: Pki) -> None:
    cert_path, key_path = pki.issue_controller("ingest-2", now=NOW)
    assert common_name(x509.load_pem_x509_certificate(cert_path.read_bytes())) == "ingest-2"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert pki.controllers(NOW) == ["controller", "ingest-2"]


def test_certificates_expire_after_the_days_asked(pki: Pki) -> None:
    cert = pki.issue_client(build_csr(new_key(), "x"), common_name="tc-1", days=90, now=NOW)
    assert cert.not_valid_after_utc == NOW + timedelta(days=90)
    assert cert.not_valid_before_utc < NOW  # a device clock a little behind still accepts it
    with pytest.raises(PkiError, match="out of range"):
        pki.issue_client(build_csr(new_key(), "x"), common_name="tc-1", days=0)
    with pytest.raises(PkiError, match="out of range"):
        pki.issue_client(build_csr(new_key(), "x"), common_name="tc-1", days=10_000)


def test_issue_client_key_returns_a_matching_pair(pki: Pki) -> None:
    key_pem, cert_pem = pki.issue_client_key("tc-1", 1 / 24, now=NOW)
    key = serialization.load_pem_private_key(key_pem, None)
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert cert.public_key() == key.public_key()
    assert cert.not_valid_after_utc == NOW + timedelta(hours=1)


def test_serials_are_random_and_indexed(pki: Pki) -> None:
    serials = {
        pki.issue_client(build_csr(new_key(), "x"), common_name="tc-1", now=NOW).serial_number
        for _ in range(3)
    }
    assert len(serials) == 3 and all(s.bit_length() > 64 for s in serials)
    assert {c.serial for c in pki.issued("tc-1")} == serials


# -- revocation and the CRL -------------------------------------------------------------------------


def test_revocation_lists_every_unexpired_serial_of_that_name(pki: Pki) -> None:
    first = pki.issue_client(build_csr(new_key(), "x"), common_name="tc-1", now=NOW).serial_number
    second = pki.issue_client(build_csr(new_key(), "x"), common_name="tc-1", now=NOW).serial_number
    expired = pki.issue_client(
        build_csr(new_key(), "x"), common_name="tc-1", days=1, now=NOW - timedelta(days=5)
    ).serial_number
    other = pki.issue_client(build_csr(new_key(), "x"), common_name="tc-2", now=NOW).serial_number

    revoked = pki.revoke("tc-1", "laptop stolen", now=NOW)

    assert sorted(revoked) == sorted([first, second])
    assert revoked_serials(pki) == {first, second}
    assert other not in revoked_serials(pki) and expired not in revoked_serials(pki)
    assert pki.crl().is_signature_valid(pki.ca_cert.public_key())  # type: ignore[arg-type]
    assert {c.reason for c in pki.issued("tc-1") if c.revoked_at} == {"laptop stolen"}
    assert pki.revoke("tc-1", "again", now=NOW) == []  # nothing left to revoke
    assert revoked_serials(pki) == {first, second}


def test_a_revoked_serial_leaves_the_crl_once_its_certificate_expired(pki: Pki) -> None:
    serial = pki.issue_client(build_csr(new_key(), "x"), common_name="tc-1", days=2, now=NOW).serial_number
    pki.revoke("tc-1", "lost", now=NOW)
    assert revoked_serials(pki) == {serial}
    assert pki.refresh_crl_if_due(NOW + timedelta(days=4))
    assert revoked_serials(pki) == set()


def test_crl_is_refreshed_when_half_its_validity_is_gone(pki: Pki) -> None:
    issued_at = pki.crl().last_update_utc
    assert not pki.refresh_crl_if_due(NOW + CRL_VALIDITY / 2 - timedelta(minutes=10))
    assert pki.crl().last_update_utc == issued_at
    later = NOW + CRL_VALIDITY / 2 + timedelta(minutes=1)
    assert pki.refresh_crl_if_due(later)
    crl = pki.crl()
    assert crl.next_update_utc is not None and crl.next_update_utc > later + CRL_VALIDITY / 2
    assert not pki.refresh_crl_if_due(later)  # fresh again


def test_crl_older_than_the_index_is_reissued(pki: Pki) -> None:
    """A crash between the index write and the CRL write: the revocation must still reach the CRL."""
    serial = pki.issue_client(build_csr(new_key(), "x"), common_name="tc-1", now=NOW).serial_number
    old_crl = pki.crl_pem()
    pki.revoke("tc-1", "lost", now=NOW)
    pki.crl_path.write_bytes(old_crl)  # as if the CRL write never happened
    assert pki.refresh_crl_if_due(NOW)
    assert revoked_serials(pki) == {serial}


def test_missing_or_foreign_crl_is_reissued(pki: Pki, tmp_path: Path) -> None:
    other = Pki.init(tmp_path / "other", now=NOW)
    pki.crl_path.write_bytes(other.crl_pem())
    assert pki.refresh_crl_if_due(NOW)
    assert pki.crl().is_signature_valid(pki.ca_cert.public_key())  # type: ignore[arg-type]
    pki.crl_path.unlink()
    assert pki.refresh_crl_if_due(NOW)


def test_index_is_json_without_secrets(pki: Pki) -> None:
    pki.issue_client(build_csr(new_key(), "x"), common_name="tc-1", now=NOW)
    doc = json.loads(pki.files.index.read_text())
    assert {c["cn"] for c in doc["certificates"]} >= {"tc-1", "controller"}
    assert "PRIVATE" not in pki.files.index.read_text()


def test_a_large_index_still_loads(pki: Pki) -> None:
    """Far more certificates than fit in a key-sized file (64 KiB): ~200 bytes each."""
    index = pki.files.read_index()
    for n in range(1000):
        cert = IssuedCert(n + 1, f"tc-{n}", Role.AGENT, NOW, NOW + timedelta(days=90))
        index = index.with_cert(cert, NOW)
    pki.files.write_index(index)
    assert pki.files.index.stat().st_size > 128 * 1024
    assert len(pki.issued()) > 1000
    assert revoked_serials(pki) == set() and len(pki.revoke("tc-7", "lost", now=NOW)) == 1
