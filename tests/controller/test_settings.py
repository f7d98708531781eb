"""Settings layering: defaults < TOML file < CLEANROOM_* environment < flags; clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from cleanroom_controller import SettingsError, load_settings, parse_broker_url


def test_layers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('broker = "mqtt://file:1"\nid = "from-file"\ncommand_timeout = 7\n')
    monkeypatch.setenv("CLEANROOM_ID", "from-env")
    s = load_settings(cfg, broker="mqtt://flag:2")
    assert (s.broker, s.id, s.command_timeout) == ("mqtt://flag:2", "from-env", 7.0)
    assert s.data_dir == Path("/var/lib/cleanroom-controller")


def test_bad_values_are_named(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("command_timeout = -1\n")
    with pytest.raises(SettingsError, match="command_timeout"):
        load_settings(cfg)
    with pytest.raises(SettingsError, match=r"missing\.toml"):
        load_settings(tmp_path / "missing.toml")
    cfg.write_text("nonsense = 1\n")
    with pytest.raises(SettingsError, match="nonsense"):
        load_settings(cfg)


def test_broker_url() -> None:
    assert parse_broker_url("mqtt://127.0.0.1:1884").port == 1884
    assert parse_broker_url("mqtts://h").tls
    with pytest.raises(ValueError, match="scheme"):
        parse_broker_url("http://h")


def test_a_broker_url_with_credentials_is_refused_without_showing_them() -> None:
    """The controller writes its broker URL into the append-only audit trail: a password there would stay."""
    with pytest.raises(SettingsError, match="credentials") as caught:
        load_settings(broker="mqtts://ctl:hunter2@broker:8883")
    assert "hunter2" not in str(caught.value)
