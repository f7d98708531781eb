"""`pki init|issue-controller|issue-server|show`, `broker-config`, `broker-reload`: what they print, write,
audit and refuse (exit 2 with `error: …`, never a traceback)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from typer.testing import CliRunner

from cleanroom_controller.cli import app
from cleanroom_controller.trust import Pki

runner = CliRunner()


def cli(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.stdout, result.stderr


def audit_kinds(data_dir: Path) -> list[str]:
    con = sqlite3.connect(data_dir / "controller.db")
    try:
        return [row[0] for row in con.execute("SELECT kind FROM audit ORDER BY id")]
    finally:
        con.close()


def test_pki_init_prints_the_fingerprint_once_and_refuses_twice(tmp_path: Path) -> None:
    data = tmp_path / "ctl"
    code, out, err = cli("pki", "init", "--data-dir", str(data), "--broker-host", "mqtt.example")
    assert code == 0, err
    fingerprint = Pki.load(data).ca_fingerprint
    assert out == f"CA fingerprint {fingerprint}\n"
    assert "mqtt.example" in err and "broker-config" in err
    assert audit_kinds(data) == ["operator.pki_init"]

    code, out, err = cli("pki", "init", "--data-dir", str(data))
    assert code == 2 and "already exists" in err and out == ""
    assert Pki.load(data).ca_fingerprint == fingerprint


def test_pki_show_and_issue_controller(tmp_path: Path) -> None:
    data = tmp_path / "ctl"
    assert cli("pki", "init", "--data-dir", str(data))[0] == 0
    code, _, err = cli("pki", "issue-controller", "ingest-2", "--data-dir", str(data))
    assert code == 0, err
    code, out, _ = cli("pki", "show", "--json", "--data-dir", str(data))
    shown = json.loads(out)
    assert sorted(shown["controllers"]) == ["controller", "ingest-2"]
    assert shown["broker_hosts"] == ["localhost", "127.0.0.1"]
    assert shown["ca_fingerprint"] == Pki.load(data).ca_fingerprint
    code, _, err = cli("pki", "issue-controller", "bad/name", "--data-dir", str(data))
    assert code == 2 and "not usable" in err
    assert audit_kinds(data) == ["operator.pki_init", "operator.pki_issue_controller"]


def test_broker_config_without_pki_says_how_to_make_one(tmp_path: Path) -> None:
    code, _, err = cli("broker-config", "--out", str(tmp_path / "b"), "--data-dir", str(tmp_path / "none"))
    assert code == 2 and "pki init" in err


def test_broker_config_writes_the_files_and_reload_needs_a_running_broker(tmp_path: Path) -> None:
    data, out_dir = tmp_path / "ctl", tmp_path / "broker"
    assert cli("pki", "init", "--data-dir", str(data))[0] == 0
    code, _, err = cli(
        "broker-config", "--out", str(out_dir), "--data-dir", str(data), "--listen", "127.0.0.1:8884"
    )
    assert code == 0, err
    assert "listener 8884 127.0.0.1" in (out_dir / "mosquitto.conf").read_text()
    assert "kill -HUP" in err
    code, _, err = cli("broker-reload", "--out", str(out_dir), "--data-dir", str(data))
    assert code == 2 and "no pid file" in err
