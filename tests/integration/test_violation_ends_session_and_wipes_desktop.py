"""A denied process at a real endpoint → the VDI session is ended on the endpoint (its process tree gone, the
ack in the audit trail) AND its desktop is logged off and wiped back to its golden image, each side's
entries in order in the audit trail.

Real Mosquitto, controller and agent processes; the VDI client is a renamed copy of ``tail`` called
``xfreerdp`` and started as ``xfreerdp -q -f /dev/null /v:10.20.0.11 /u:clerk`` (the agent reads the desktop's
address and the user from those arguments, as from the real client); the wipe runs on real qcow2 files with
qemu-img. Simulated: the hypervisor (no KVM here), through libvirt's test driver loaded from a node XML file
that defines the desktop's domain on that overlay; its domain state lives inside the controller process.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.mosquitto import Mosquitto
from tests.support.procs import Cleanroom, audit_entries, cleanroom
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

ADDRESS = "10.20.0.11"
USER = "clerk"
NODE_XML = """<node>
<domain type='test'><name>bill-01</name><memory>65536</memory><os><type>hvm</type></os>
<devices><disk type='file' device='disk'><source file='{overlay}'/><target dev='vda'/></disk></devices>
</domain>
</node>
"""


@pytest.fixture
def world(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Cleanroom]:
    with cleanroom(tmp_path, mosquitto) as w:
        yield w


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def qemu_io(image: Path, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", command, str(image)], capture_output=True, text=True, check=False
    )


def libvirt_desktop(root: Path) -> tuple[Path, Path, Path]:
    """A golden image with content of its own, the desktop's overlay on it, and the desktops file."""
    images = root / "images"
    images.mkdir(parents=True)
    golden, overlay = images / "billing.qcow2", images / "bill-01.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(golden), "16M"], check=True)
    assert qemu_io(golden, "write -P 0x11 0 1M").returncode == 0
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(golden), "-F", "qcow2", str(overlay)],
        check=True,
    )
    node = root / "hypervisor.xml"
    node.write_text(NODE_XML.format(overlay=overlay))
    desktops = root / "desktops.toml"
    desktops.write_text(f"""
[[pool]]
id = "billing"
driver = "libvirt"
uri = "test://{node}"
wipe = "overlay"
timeout_s = 20
[[pool.desktop]]
id = "bill-01"
address = "{ADDRESS}"
domain = "bill-01"
overlay = "{overlay}"
golden = "{golden}"
""")
    return golden, overlay, desktops


def find(entries: list[dict[str, Any]], kind: str, **match: Any) -> int | None:
    """Position of the first entry of ``kind`` whose data has every ``match`` value (each entry found by its
    own identity, never by searching after another one: the order is then a real comparison)."""
    for i, e in enumerate(entries):
        if e["kind"] != kind:
            continue
        data = json.loads(e["data_json"])
        if all(data.get(k) == v for k, v in match.items()):
            return i
    return None


def describe(entries: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"  {e['id']:>4} {e['kind']:<20} {e['subject']:<10} {e['data_json'][:140]}" for e in entries
    )


def test_violation_ends_the_session_on_the_endpoint_and_wipes_its_desktop_in_audit_order(
    world: Cleanroom,
) -> None:
    golden, overlay, desktops = libvirt_desktop(world.root)
    golden_before = sha256(golden)
    world.write_policy(
        heartbeat_s=2, end_grace_s=1.0, clients=["xfreerdp"], actions=["end_session", "wipe_desktop"]
    )
    ctl = world.start_controller("--desktops", str(desktops))
    session = world.spawn(
        "xfreerdp", program="/usr/bin/tail", args=["-q", "-f", "/dev/null", f"/v:{ADDRESS}", f"/u:{USER}"]
    )
    world.add_agent("it-agent")
    world.wait_agent(
        "it-agent", timeout=30, what="it-agent online and compliant", online=True, compliant=True
    )
    world.wait_session(session.session_id, timeout=15, what="the session listed running", state="running")

    def desktop() -> dict[str, Any] | None:
        rows = ctl.db_rows("SELECT * FROM desktops WHERE id = 'bill-01'")
        return rows[0] if rows else None

    wait_for(
        lambda: (
            (d := desktop()) is not None and d["state"] == "in_use" and d["session_id"] == session.session_id
        ),
        timeout=10,
        what="bill-01 in_use by the session",
    )
    # What the worker staged on the desktop: it must not survive the wipe.
    assert qemu_io(overlay, "write -P 0x5e 1M 1M").returncode == 0
    assert qemu_io(overlay, "read -P 0x5e 1M 1M").returncode == 0

    world.spawn_denied()
    denied = f"denied_process:{world.denied_name}"
    wait_for(
        lambda: not session.live_pids(), timeout=20, what=f"the session's tree {session.tree_pids()} gone"
    )
    wait_for(lambda: (d := desktop()) is not None and d["state"] == "clean", timeout=20, what="bill-01 clean")

    def chain() -> dict[str, int] | None:
        entries = audit_entries(ctl.db_path)
        at: dict[str, int | None] = {
            "in_use": find(
                entries, "desktop.in_use", session_id=session.session_id, user=USER, address=ADDRESS
            ),
            "ending": find(entries, "desktop.ending", session_id=session.session_id, previous="in_use"),
            "ended": find(entries, "desktop.ended", session_id=session.session_id, previous="ending"),
            "wiping": find(entries, "desktop.wiping", previous="ended"),
            "clean": find(entries, "desktop.clean", previous="wiping"),
            "command": find(entries, "command", session_id=session.session_id, action="end_session"),
        }
        decision = next(
            (
                i
                for i, e in enumerate(entries)
                if e["kind"] == "decision"
                and denied in json.loads(e["data_json"]).get("reasons", [])
                and {"action": "wipe_desktop", "session": session.session_id}.items()
                <= next(
                    (a for a in json.loads(e["data_json"])["actions"] if a.get("action") == "wipe_desktop"),
                    {},
                ).items()
            ),
            None,
        )
        at["decision"] = decision
        command = at["command"]
        if command is not None:
            at["ack"] = find(
                entries, "ack", command_id=json.loads(entries[command]["data_json"])["id"], result="ended"
            )
        if any(v is None for v in at.values()):
            return None
        return {k: v for k, v in at.items() if v is not None}

    try:
        at = wait_for(chain, timeout=15, what="the endpoint's and the desktop's entries in the audit trail")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\naudit trail:\n{describe(audit_entries(ctl.db_path))}") from None
    trail = describe(audit_entries(ctl.db_path))
    # The endpoint side: decision → end_session command → its ended ack.
    assert at["in_use"] < at["decision"] < at["command"] < at["ack"], (
        f"endpoint side out of order {at}\n{trail}"
    )
    # The desktop side, started by the same decision, never waiting for the ack.
    assert at["decision"] < at["ending"] < at["ended"] < at["wiping"] < at["clean"], (
        f"desktop side out of order {at}\n{trail}"
    )
    # Started by the decision's wipe_desktop action itself (not by the session's end at the endpoint, which
    # would also log the desktop off, later and for another reason), and without waiting for the ack.
    entries = audit_entries(ctl.db_path)
    wipe_action = next(
        a
        for a in json.loads(entries[at["decision"]]["data_json"])["actions"]
        if a["action"] == "wipe_desktop"
    )
    ending = json.loads(entries[at["ending"]]["data_json"])
    assert denied in wipe_action["reason"] and ending["reason"] == wipe_action["reason"], (
        f"the desktop's log-off is not the decision's wipe_desktop: {ending} vs {wipe_action}"
    )
    assert at["ending"] < at["ack"], f"the desktop side waited for the endpoint's ack {at}\n{trail}"
    clean = json.loads(audit_entries(ctl.db_path)[at["clean"]]["data_json"])
    assert "fresh on billing.qcow2" in clean["detail"] and "running" in clean["detail"], clean

    # On disk: what was staged is gone, the overlay is a fresh one on the golden image, the golden untouched.
    assert qemu_io(overlay, "read -P 0x5e 1M 1M").returncode != 0, "staged data survived the wipe"
    assert qemu_io(overlay, "read -P 0 1M 1M").returncode == 0
    assert qemu_io(overlay, "read -P 0x11 0 1M").returncode == 0, (
        "the overlay no longer shows the golden image"
    )
    assert sha256(golden) == golden_before, "the golden image changed"

    assert ctl.audit_verify().returncode == 0
    ctl.assert_alive()
