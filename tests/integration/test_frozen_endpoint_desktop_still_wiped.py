"""An endpoint that never acknowledges ``end_session`` (its agent frozen with SIGSTOP, as a stolen or tampered
thin client would be) still has its desktop logged off and wiped: the controller sees the endpoint go silent,
sends ``end_session`` (no ack ever comes) and, without waiting for one, takes the desktop through log-off
(confirmed by polling) and a wipe.

Real Mosquitto, controller and agent processes; the VDI client is a renamed ``tail`` started as
``xfreerdp -q -f /dev/null /v:10.30.0.21 /u:clerk``. Simulated: the VDI broker, by the command driver's real
scripts working on files (a logged-on user file removed asynchronously after the log-off call returns, as
Citrix's ``Stop-BrokerSession`` does; a desktop disk file put back to its golden content by the wipe).
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support.mosquitto import Mosquitto
from tests.support.procs import Cleanroom, audit_entries, cleanroom
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

ADDRESS = "10.30.0.21"
USER = "clerk"


@pytest.fixture
def world(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Cleanroom]:
    with cleanroom(tmp_path, mosquitto) as w:
        yield w


def script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


def vdi_broker(root: Path) -> tuple[Path, Path, Path, Path]:
    """The simulated VDI broker's scripts and files; returns (desktops file, calls log, logged-on file,
    desktop disk)."""
    site = root / "site"
    site.mkdir(parents=True)
    calls, logged_on, disk, golden = site / "calls", site / "logged-on", site / "disk", site / "golden"
    golden.write_text("golden image\n")
    disk.write_text("golden image\n")
    logoff = script(
        site / "logoff",
        f"""\
        echo "logoff $1 $2" >> {calls}
        # asynchronous, like Stop-BrokerSession: the user is gone a moment after this returns
        (sleep 0.3; rm -f {logged_on}) >/dev/null 2>&1 &
        exit 0
        """,
    )
    gone = script(site / "session-gone", f'[ -e {logged_on} ] && exit 1\necho "gone $1" >> {calls}\nexit 0\n')
    wipe = script(site / "refresh", f'echo "wipe $1" >> {calls}\ncp {golden} {disk}\nexit 0\n')
    ready = script(site / "ready", f"cmp -s {golden} {disk}\n")
    desktops = root / "desktops.toml"
    desktops.write_text(f"""
[[pool]]
id = "horizon"
driver = "command"
timeout_s = 20
[pool.command]
log_off = ["{logoff}", "{{user}}", "{{desktop}}"]
session_gone = ["{gone}", "{{user}}"]
wipe = ["{wipe}", "{{desktop}}"]
ready = ["{ready}", "{{desktop}}"]
poll_s = 0.2
[[pool.desktop]]
id = "hz-01"
address = "{ADDRESS}"
""")
    return desktops, calls, logged_on, disk


def find(entries: list[dict[str, Any]], kind: str, **match: Any) -> int | None:
    for i, e in enumerate(entries):
        if e["kind"] == kind and all(json.loads(e["data_json"]).get(k) == v for k, v in match.items()):
            return i
    return None


def describe(entries: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"  {e['id']:>4} {e['kind']:<20} {e['subject']:<10} {e['data_json'][:140]}" for e in entries
    )


def test_frozen_endpoint_never_acks_end_session_and_its_desktop_is_still_logged_off_and_wiped(
    world: Cleanroom,
) -> None:
    desktops, calls, logged_on, disk = vdi_broker(world.root)
    world.write_policy(
        heartbeat_s=1, max_offline_s=600, clients=["xfreerdp"], actions=["end_session", "wipe_desktop"]
    )
    ctl = world.start_controller("--desktops", str(desktops))
    session = world.spawn(
        "xfreerdp", program="/usr/bin/tail", args=["-q", "-f", "/dev/null", f"/v:{ADDRESS}", f"/u:{USER}"]
    )
    agent = world.add_agent("it-agent")
    world.wait_agent(
        "it-agent", timeout=30, what="it-agent online and compliant", online=True, compliant=True
    )

    def desktop_state() -> str | None:
        rows = ctl.db_rows("SELECT state, session_id FROM desktops WHERE id = 'hz-01'")
        return str(rows[0]["state"]) if rows and rows[0]["session_id"] == session.session_id else None

    wait_for(lambda: desktop_state() == "in_use", timeout=10, what="hz-01 in_use by the session")
    logged_on.write_text(USER)  # the worker is logged on at the desktop, and stages data there
    disk.write_text("golden image\nstaged PHI\n")

    agent.freeze()
    try:
        wait_for(
            lambda: ctl.db_rows("SELECT state FROM desktops WHERE id = 'hz-01'")[0]["state"] == "clean",
            timeout=15,
            what="hz-01 wiped clean",
        )
        # Nothing came from the endpoint meanwhile: it is still frozen and its client still runs.
        assert psutil.Process(agent.pid).status() == psutil.STATUS_STOPPED
        assert session.live_pids(), "the endpoint ended the client: it was not frozen"
        entries = audit_entries(ctl.db_path)
    finally:
        agent.thaw()

    trail = describe(entries)
    decision = next(
        (
            i
            for i, e in enumerate(entries)
            if e["kind"] == "decision"
            and json.loads(e["data_json"])["condition"] in ("silent", "offline")
            and any(
                a == {**a, "action": "wipe_desktop", "session": session.session_id}
                for a in json.loads(e["data_json"])["actions"]
            )
        ),
        None,
    )
    assert decision is not None, f"no silent/offline decision with wipe_desktop for the session\n{trail}"
    wipe_action = next(
        a for a in json.loads(entries[decision]["data_json"])["actions"] if a["action"] == "wipe_desktop"
    )
    command = find(entries, "command", session_id=session.session_id, action="end_session")
    assert command is not None, f"end_session was never sent to the endpoint\n{trail}"
    command_id = json.loads(entries[command]["data_json"])["id"]
    assert find(entries, "ack", command_id=command_id) is None, f"a frozen endpoint acknowledged\n{trail}"
    found = {
        "ending": find(
            entries, "desktop.ending", session_id=session.session_id, reason=wipe_action["reason"]
        ),
        "ended": find(entries, "desktop.ended", session_id=session.session_id, previous="ending"),
        "wiping": find(entries, "desktop.wiping", previous="ended"),
        "clean": find(entries, "desktop.clean", previous="wiping"),
    }
    at = {k: v for k, v in found.items() if v is not None}
    assert len(at) == len(found), f"desktop entries missing {found}\n{trail}"
    assert decision < at["ending"] < at["ended"] < at["wiping"] < at["clean"], f"out of order {at}\n{trail}"
    ended = json.loads(entries[at["ended"]]["data_json"])
    assert "confirmed after" in ended["detail"], f"the log-off was not confirmed by polling: {ended}"

    # The site's scripts saw the user the agent read from the client's arguments, log-off before wipe.
    assert calls.read_text().splitlines() == [f"logoff {USER} hz-01", f"gone {USER}", "wipe hz-01"]
    assert disk.read_text() == "golden image\n", "the staged data survived the wipe"
    assert ctl.audit_verify().returncode == 0
    ctl.assert_alive()
