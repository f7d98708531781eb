"""Policy loading: the issue's example loads; broken files are refused naming file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from cleanroom_protocol import PolicyError, load_policy, parse_policy, policy_hash

REPO = Path(__file__).resolve().parents[2]

EXAMPLE = """
id = "offshore-billing"
version = 3
[report]
heartbeat_s = 30          # posture at start, on every change, and at least this often
max_offline_s = 120       # the agent ends sessions itself when cut off longer than this
[sessions]
clients = ["xfreerdp", "xfreerdp3", "remote-viewer", "vmware-view", "wfica"]   # VDI client executables
[processes]
deny = ["anydesk", "teamviewer", "scrot", "obs"]   # must never run on the endpoint
[on_violation]
actions = ["end_session"]  # a desktop wipe action comes with the drivers issue
"""


def test_issue_example_loads() -> None:
    policy = parse_policy(EXAMPLE)
    assert (policy.id, policy.version) == ("offshore-billing", 3)
    assert policy.report.heartbeat_s == 30 and policy.report.max_offline_s == 120
    assert "wfica" in policy.sessions.clients
    assert policy.processes.deny == ["anydesk", "teamviewer", "scrot", "obs"]
    assert policy.on_violation.actions == ["end_session"]


def test_every_shipped_policy_loads() -> None:
    files = sorted((REPO / "policies").glob("*.toml"))
    assert files, "no policies shipped"
    for path in files:
        load_policy(path)


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('id = "x"\nversion = 1\n[report\nheartbeat_s = 5\n')
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert str(path) in str(err.value) and "line 3" in str(err.value)


def test_wrong_type_names_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('id = "x"\nversion = 1\n\n[report]\nheartbeat_s = "often"\n')
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert f"{path}:5: field report.heartbeat_s" in str(err.value)


def test_misspelt_key_is_an_error_not_ignored() -> None:
    with pytest.raises(PolicyError, match=r"<policy>:4: field processes.denny"):
        parse_policy('id = "x"\nversion = 1\n[processes]\ndenny = ["obs"]\n')


def test_missing_required_field() -> None:
    with pytest.raises(PolicyError, match="field version"):
        parse_policy('id = "x"\n')


def test_out_of_range_and_unknown_action() -> None:
    with pytest.raises(PolicyError, match=r"report\.heartbeat_s"):
        parse_policy('id = "x"\nversion = 1\n[report]\nheartbeat_s = 0\n')
    with pytest.raises(PolicyError, match=r"on_violation\.actions"):
        parse_policy('id = "x"\nversion = 1\n[on_violation]\nactions = ["reboot"]\n')


def test_executable_names_cannot_be_paths() -> None:
    with pytest.raises(PolicyError, match=r"processes\.deny"):
        parse_policy('id = "x"\nversion = 1\n[processes]\ndeny = ["/usr/bin/obs"]\n')


def test_unreadable_and_oversized_files(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "missing.toml")
    big = tmp_path / "big.toml"
    big.write_text('id = "x"\nversion = 1\n#' + "x" * 300_000 + "\n")
    with pytest.raises(PolicyError, match="larger than"):
        load_policy(big)


def test_hash_is_stable_and_changes_with_content() -> None:
    a, b = parse_policy(EXAMPLE), parse_policy(EXAMPLE)
    assert policy_hash(a) == policy_hash(b)
    assert policy_hash(a) != policy_hash(parse_policy(EXAMPLE.replace("version = 3", "version = 4")))


def test_a_usb_rule_usbguard_refuses_refuses_the_policy_naming_file_line_rule_and_column(
    tmp_path: Path,
) -> None:
    """The rules are parsed where the policy is loaded (controller and agent alike), so a broken rule never
    reaches an endpoint, where it would leave the USB enforcer degraded and every new device blocked."""
    path = tmp_path / "site.toml"
    path.write_text(
        'id = "p"\nversion = 1\n\n[usb]\nrules = ["allow id 1234:5678", "allow with-interface *:*:*"]\n'
    )
    with pytest.raises(
        PolicyError, match=r"site\.toml:5: field usb\.rules: .*usb rule 2, column 22: bad interface"
    ):
        load_policy(path)
