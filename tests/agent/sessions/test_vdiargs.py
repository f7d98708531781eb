"""The VDI client argument parser: address, user, desktop name; never a password."""

from __future__ import annotations

import pytest

from cleanroom_agent.sessions.vdiargs import VdiTarget, parse_client_args

SECRET = "Hunter2-s3cret"  # noqa: S105 (a made-up password the parser must never report)


@pytest.mark.parametrize(
    ("client", "argv", "expected"),
    [
        (
            "xfreerdp",
            ["xfreerdp", "/v:10.20.0.11", "/u:w123", f"/p:{SECRET}"],
            VdiTarget("10.20.0.11", "w123"),
        ),
        (
            "xfreerdp3",
            ["xfreerdp3", "/v:host.example:3390", "/u:w1", "/d:CORP"],
            VdiTarget("host.example:3390", "CORP\\w1"),
        ),
        (
            "xfreerdp",
            ["xfreerdp", "/v:10.0.0.5", "/port:3391", f"/password:{SECRET}"],
            VdiTarget("10.0.0.5:3391"),
        ),
        ("remote-viewer", ["remote-viewer", "spice://10.20.0.12:5901"], VdiTarget("10.20.0.12:5901")),
        (
            "remote-viewer",
            ["remote-viewer", "--full-screen", "spice://h.example?port=5902"],
            VdiTarget("h.example:5902"),
        ),
        (
            "remote-viewer",
            ["remote-viewer", f"spice://bob:{SECRET}@10.1.1.1:5900"],
            VdiTarget("10.1.1.1:5900"),
        ),
        (
            "vmware-view",
            [
                "vmware-view",
                "--serverURL",
                "https://hz.example.org",
                "--userName",
                "w9",
                "--password",
                SECRET,
                "--domainName",
                "CORP",
                "--desktopName",
                "Billing Pool",
            ],
            VdiTarget("hz.example.org", "CORP\\w9", "Billing Pool"),
        ),
        (
            "vmware-view",
            ["vmware-view", "-s", "hz.example.org", "-p", SECRET, "-u", "w9", "-n", "Coding"],
            VdiTarget("hz.example.org", "w9", "Coding"),
        ),
        ("vmware-view", ["vmware-view", f"--password={SECRET}", "--serverURL=hz:443"], VdiTarget("hz:443")),
        ("wfica", ["wfica", "/tmp/launch.ica"], VdiTarget()),
        ("xfreerdp", ["xfreerdp", "/v:$(reboot)", "/u:<b>x</b>"], VdiTarget()),
    ],
)
def test_parse(client: str, argv: list[str], expected: VdiTarget) -> None:
    target = parse_client_args(client, argv)
    assert target == expected
    assert SECRET not in repr(target)


def test_password_right_before_a_value_option_is_skipped_not_taken_as_user() -> None:
    target = parse_client_args("vmware-view", ["vmware-view", "--password", "-u", "--userName", "w1"])
    assert target.user == "w1"


def test_find_sessions_reports_the_target_from_the_client_command_line() -> None:
    from cleanroom_agent.sessions.clients import ProcessSnapshot, find_sessions

    procs = [
        ProcessSnapshot(1, 0, "init", None, 1.0),
        ProcessSnapshot(
            50,
            1,
            "xfreerdp",
            "xfreerdp",
            2.0,
            "alice",
            ("xfreerdp", "/v:10.20.0.11", "/u:w7", f"/p:{SECRET}"),
        ),
    ]
    [session] = find_sessions(procs, ["xfreerdp"], set())
    assert (session.desktop_address, session.desktop_user, session.desktop_name) == ("10.20.0.11", "w7", None)
    assert SECRET not in session.model_dump_json()
