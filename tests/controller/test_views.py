"""What `agents list` shows: ``compliant`` is true only while the endpoint's condition is compliant."""

from __future__ import annotations

import json
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


def test_the_spool_of_the_latest_posture_is_shown_and_unknown_without_one(tmp_path: Path) -> None:
    """``spool_full``/``spool_refused`` from the posture the store holds for each endpoint: ``None`` (unknown)
    before a first posture, and for a value that is not what the protocol allows (never trusted as markup or
    as a number it is not)."""
    store = Store.open(tmp_path)
    postures: dict[str, dict[str, object] | None] = {
        "full": {"spool_full": True, "spool_refused": 12},
        "old": {},  # a posture from an agent before the spool fields: their defaults
        "none": None,
        "odd": {"spool_full": "[red]yes", "spool_refused": True},
    }
    for agent, body in postures.items():
        enrol(store, agent, Ed25519PrivateKey.generate())
        store.save_endpoint(
            EndpointState(agent, Condition.COMPLIANT, True, True, (), 1.0),
            posture=None if body is None else json.dumps(body),
        )
    shown = {r["id"]: (r["spool_full"], r["spool_refused"]) for r in agent_rows(store)}
    assert shown == {"full": (True, 12), "old": (False, 0), "none": (None, None), "odd": (None, None)}
    # a later save without a posture (a status, the silence clock) keeps the one stored
    store.save_endpoint(EndpointState("full", Condition.SILENT, True, True, ("no_report_for:93s",), 2.0))
    assert next(r for r in agent_rows(store) if r["id"] == "full")["spool_refused"] == 12
