"""TLS settings beside the broker URL: TOML, CLEANROOM_* environment and flags; refused with mqtt://."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cleanroom_controller import SettingsError, load_settings
from cleanroom_protocol import TlsFiles


def test_tls_files_reach_the_broker_address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[controller]\nbroker = "mqtts://broker.example"\ntls-ca = "/pki/ca.crt"\n')
    monkeypatch.setenv("CLEANROOM_TLS_CERT", "/pki/controllers/controller.crt")
    s = load_settings(cfg, tls_key=Path("/pki/controllers/controller.key"))
    assert s.broker_address.tls_files == TlsFiles(
        Path("/pki/ca.crt"), Path("/pki/controllers/controller.crt"), Path("/pki/controllers/controller.key")
    )


def test_tls_files_with_a_plain_broker_are_refused() -> None:
    with pytest.raises(
        SettingsError, match=re.escape("tls_key given but broker mqtt://127.0.0.1:1883 is plain")
    ):
        load_settings(None, tls_cert=None, tls_key=Path("/k"))


def test_certificate_without_key_is_refused() -> None:
    with pytest.raises(SettingsError, match="tls_cert and tls_key go together"):
        load_settings(None, broker="mqtts://b", tls_cert=Path("/c"))
