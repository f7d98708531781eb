"""The `cleanroom-agent` command line as a user runs it: real processes, clear errors, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cleanroom_agent.enforcers import ENFORCER_NAMES
from cleanroom_protocol import Posture, parse_public_key


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cleanroom_agent", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=env,
    )


def test_identity_creates_a_0600_key_once_and_prints_its_public_pem(tmp_path: Path) -> None:
    first = cli("identity", "--data-dir", str(tmp_path / "d"))
    assert first.returncode == 0, first.stderr
    parse_public_key(first.stdout.encode())
    assert (tmp_path / "d" / "agent.key").stat().st_mode & 0o777 == 0o600
    again = cli("identity", "--data-dir", str(tmp_path / "d"))
    assert again.stdout == first.stdout and "created" not in again.stderr


def test_check_prints_posture_as_text_and_json(tmp_path: Path) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text('id = "p"\nversion = 2\n[processes]\ndeny = ["surely-not-running"]\n')
    text = cli("check", "--data-dir", str(tmp_path), "--policy", str(policy))
    assert text.returncode == 0, text.stderr
    assert "policy     p@2 (bootstrap)" in text.stdout and "compliant" in text.stdout
    js = cli("check", "--json", "--data-dir", str(tmp_path), "--policy", str(policy), "--id", "ep-9")
    posture = Posture.model_validate(json.loads(js.stdout))
    assert posture.agent_id == "ep-9" and posture.policy is not None and posture.policy.version == 2
    # one status per enforcer, whatever their state
    assert sorted(e.name for e in posture.enforcers) == sorted(ENFORCER_NAMES)
    assert not (tmp_path / "agent.db").exists()  # check changes nothing


def test_user_mistakes_are_clear_errors(tmp_path: Path) -> None:
    cases = {
        ("run", "--data-dir", str(tmp_path)): "--controller-key FILE is required",
        ("run", "--controller-key", str(tmp_path / "nope.pem"), "--data-dir", str(tmp_path)): "nope.pem",
        ("run", "--broker", "http://x:1", "--controller-key", "k"): "scheme must be mqtt:// or mqtts://",
        ("run", "--config", str(tmp_path / "missing.toml")): "missing.toml: cannot read config",
        ("check", "--policy", str(tmp_path / "nope.toml")): "nope.toml: cannot read policy",
    }
    for args, message in cases.items():
        done = cli(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)


def test_a_broken_bootstrap_policy_is_named(tmp_path: Path) -> None:
    key = tmp_path / "controller.pub"
    key.write_text(cli("identity", "--data-dir", str(tmp_path / "ctl")).stdout)
    policy = tmp_path / "bad.toml"
    policy.write_text('id = "p"\nversion = 1\n[sessions]\nclients = "xfreerdp"\n')
    done = cli(
        "run", "--data-dir", str(tmp_path / "d"), "--controller-key", str(key), "--policy", str(policy),
        "--socket", str(tmp_path / "s.sock"),
    )  # fmt: skip
    assert done.returncode == 2
    assert "bad.toml:4: field sessions.clients" in done.stderr and "Traceback" not in done.stderr
