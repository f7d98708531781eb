"""The one TLS client context both sides build (cleanroom_protocol.transport.tls_context): TLS 1.2 or
newer, the broker checked against the CA and its name, the client key read only when it is private.
That the broker then admits it: tests/integration/test_broker_mtls.py."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from cleanroom_controller.trust import Pki
from cleanroom_protocol import (
    TlsFiles,
    TlsSettingsError,
    client_tls_context,
    parse_broker_url,
    tls_context,
)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.init(tmp_path / "ctl")


def test_context_verifies_the_broker_and_needs_tls_12(pki: Pki) -> None:
    ctx = tls_context(pki.ca_cert_path, pki.controller_cert_path, pki.controller_key_path)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    assert len(ctx.get_ca_certs()) == 1  # our CA only, not the system trust store


def test_client_key_readable_by_others_is_refused(pki: Pki) -> None:
    pki.controller_key_path.chmod(0o640)
    with pytest.raises(TlsSettingsError, match="mode 0640"):
        tls_context(pki.ca_cert_path, pki.controller_cert_path, pki.controller_key_path)


def test_client_key_behind_a_symlink_is_refused(pki: Pki, tmp_path: Path) -> None:
    link = tmp_path / "link.key"
    link.symlink_to(pki.controller_key_path)
    with pytest.raises(TlsSettingsError, match="symbolic link"):
        tls_context(pki.ca_cert_path, pki.controller_cert_path, link)


def test_key_that_does_not_match_the_certificate_is_refused(pki: Pki) -> None:
    with pytest.raises(TlsSettingsError, match="matching key"):
        tls_context(pki.ca_cert_path, pki.controller_cert_path, pki.server_key_path)


def test_certificate_without_key_and_missing_files_are_named(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(TlsSettingsError, match="go together"):
        tls_context(pki.ca_cert_path, pki.controller_cert_path, None)
    with pytest.raises(TlsSettingsError, match=r"nope\.crt: cannot read CA certificate"):
        tls_context(tmp_path / "nope.crt", None, None)
    with pytest.raises(TlsSettingsError, match="no such file"):
        tls_context(pki.ca_cert_path, pki.controller_cert_path, tmp_path / "nope.key")
    junk = tmp_path / "junk.crt"
    junk.write_text("not a certificate")
    with pytest.raises(TlsSettingsError, match="not a PEM certificate"):
        tls_context(junk, None, None)


def test_plain_broker_has_no_context_and_mqtts_uses_the_files(pki: Pki) -> None:
    assert client_tls_context(parse_broker_url("mqtt://127.0.0.1:1883")) is None
    files = TlsFiles(pki.ca_cert_path, pki.controller_cert_path, pki.controller_key_path)
    address = parse_broker_url("mqtts://localhost").with_tls(files)
    assert address.url == "mqtts://localhost:8883"  # the files never show in what is logged
    assert isinstance(client_tls_context(address), ssl.SSLContext)
