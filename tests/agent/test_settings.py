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


def test_an_unreadable_data_dir_gives_no_enrolment_defaults_and_no_crash(tmp_path: Path) -> None:
    """An unprivileged `check` against the root-only data dir: the enrolment record cannot be read, so
    nothing is taken from it (before, is_file() raised PermissionError inside the settings validator). The
    settings load in a forked child that became `nobody`."""
    import os

    if os.geteuid() != 0:
        raise AssertionError("needs root to load the settings as another user (nobody)")
    data = tmp_path / "root-only"
    data.mkdir(mode=0o700)
    (data / "enrolment.json").write_text('{"broker_url": "mqtts://b:8883"}')
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: become nobody, load, report, exit without running pytest's teardown
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            answer = load_settings(data_dir=data).broker
        except BaseException as exc:  # report whatever happened; never return into pytest
            answer = f"raised {type(exc).__name__}: {exc}"
        os.write(write_end, answer.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        answer = f.read()
    os.waitpid(pid, 0)
    assert answer == "mqtt://127.0.0.1:1883", answer


def test_an_enrolled_data_dir_fills_broker_tls_and_controller_key(tmp_path: Path) -> None:
    (tmp_path / "enrolment.json").write_text(
        '{"broker_url": "mqtts://broker.example:8883", "controller_id": "ctl-2", '
        '"controller_url": "https://broker.example:8443"}'
    )
    (tmp_path / "controller.pub").write_text("pem")
    s = load_settings(data_dir=tmp_path)
    assert (s.broker, s.controller_id, s.enrol_url) == (
        "mqtts://broker.example:8883",
        "ctl-2",
        "https://broker.example:8443",
    )
    assert (s.tls_ca, s.tls_cert, s.tls_key) == (
        tmp_path / "tls" / "ca.crt",
        tmp_path / "tls" / "agent.crt",
        tmp_path / "tls" / "agent.key",
    )
    assert s.controller_key == tmp_path / "controller.pub"
    explicit = load_settings(data_dir=tmp_path, broker="mqtts://other:8883", controller_id="mine")
    assert (explicit.broker, explicit.controller_id) == ("mqtts://other:8883", "mine")  # flags win
