"""Settings precedence (defaults < TOML < env < flags) and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from cleanroom_agent import SettingsError, load_settings, parse_broker_url
from cleanroom_protocol import Mode


def test_broker_urls() -> None:
    a = parse_broker_url("mqtt://broker.example:1884")
    assert (a.host, a.port, a.tls) == ("broker.example", 1884, False)
    b = parse_broker_url("mqtts://broker.example")
    assert (b.port, b.tls) == (8883, True)
    for bad in ("http://x:1", "mqtt://", "mqtt://h:99999", "mqtt://h:1/path"):
        with pytest.raises(ValueError, match="broker URL"):
            parse_broker_url(bad)


def test_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('broker = "mqtt://file:1"\nid = "from-file"\nmode = "audit"\nkeepalive = 7\n')
    monkeypatch.setenv("CLEANROOM_ID", "from-env")
    monkeypatch.setenv("CLEANROOM_KEEPALIVE", "8")
    s = load_settings(config, keepalive=9, broker=None)
    assert (s.broker, s.id, s.mode, s.keepalive) == ("mqtt://file:1", "from-env", Mode.AUDIT, 9)
    assert s.key_path == Path("/var/lib/cleanroom-agent/agent.key")


def test_errors_name_the_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "agent.toml"
    bad.write_text("broker = \n")
    with pytest.raises(SettingsError, match=r"agent\.toml: invalid TOML"):
        load_settings(bad)
    with pytest.raises(SettingsError, match="cannot read config"):
        load_settings(tmp_path / "missing.toml")
    bad.write_text('brokr = "mqtt://x:1"\n')
    with pytest.raises(SettingsError, match="brokr"):
        load_settings(bad)
    with pytest.raises(SettingsError, match=r"broker: .*scheme"):
        load_settings(None, broker="ftp://x")
    with pytest.raises(SettingsError, match="id"):
        load_settings(None, id="no/slashes")
