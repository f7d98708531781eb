"""TLS settings beside the broker URL: TOML, CLEANROOM_* environment and flags; refused with mqtt://."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cleanroom_agent import SettingsError, load_settings
from cleanroom_protocol import TlsFiles


def test_tls_files_reach_the_broker_address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('broker = "mqtts://broker.example"\ntls_ca = "/etc/cleanroom/ca.crt"\n')
    monkeypatch.setenv("CLEANROOM_TLS_CERT", "/var/lib/cleanroom-agent/tls/agent.crt")
    s = load_settings(config, tls_key=Path("/var/lib/cleanroom-agent/tls/agent.key"))
    assert s.broker_address.tls_files == TlsFiles(
        Path("/etc/cleanroom/ca.crt"),
        Path("/var/lib/cleanroom-agent/tls/agent.crt"),
        Path("/var/lib/cleanroom-agent/tls/agent.key"),
    )


def test_tls_files_with_a_plain_broker_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('broker = "mqtt://broker.example"\n')
    with pytest.raises(
        SettingsError, match=re.escape("tls_ca given but broker mqtt://broker.example is plain")
    ):
        load_settings(config, tls_ca=Path("/ca.crt"))


def test_certificate_without_key_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('broker = "mqtts://broker.example"\n')
    with pytest.raises(SettingsError, match="tls_cert and tls_key go together"):
        load_settings(config, tls_cert=Path("/a.crt"))
