"""What `agents list` shows: ``compliant`` is true only while the endpoint's condition is compliant."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cleanroom_controller import Condition, EndpointState, Store
from cleanroom_controller.views import agent_rows

from .helpers import enrol


def test_compliant_means_known_compliant_now(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    states = {
        "ok": EndpointState("ok", Condition.COMPLIANT, True, True, (), 1.0),
        # The last posture was compliant, but since then the endpoint went quiet or away.
        "quiet": EndpointState("quiet", Condition.SILENT, True, True, ("no_report_for:93s",), 1.0),
        "gone": EndpointState("gone", Condition.OFFLINE, False, True, ("will",), 1.0),
        "back": EndpointState("back", Condition.UNKNOWN, True, True, (), 1.0),  # online, no posture yet
        "bad": EndpointState("bad", Condition.VIOLATION, True, False, ("denied_process:scrot",), 1.0),
    }
    for ep in states.values():
        enrol(store, ep.agent, Ed25519PrivateKey.generate())
        store.save_endpoint(ep)
    rows = {r["id"]: r for r in agent_rows(store)}
    shown = {a: (r["compliant"], r["condition"], r["reasons"]) for a, r in rows.items()}
    assert shown == {
        "ok": (True, "compliant", []),
        "quiet": (False, "silent", ["silent", "no_report_for:93s"]),
        "gone": (False, "offline", ["offline", "will"]),
        "back": (False, "unknown", []),
        "bad": (False, "violation", ["denied_process:scrot"]),
    }
