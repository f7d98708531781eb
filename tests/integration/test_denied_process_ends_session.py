"""A denied process appears on the endpoint → the controller ends the VDI session's whole process tree, and
the audit trail shows the chain of custody in order: report → decision → command → ack.

Real Mosquitto, controller and agent processes; the VDI client is a renamed /bin/sleep with a child, the
denied program a renamed /bin/sleep whose name is in the test policy's ``processes.deny`` only (a name in
the capture enforcer's deny list, such as ``anydesk``, is refused at exec by the issue-3 enforcers and never
gets to run, which is not what this test is about).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.mosquitto import Mosquitto
from tests.support.procs import Cleanroom, audit_entries, cleanroom
from tests.support.wait import wait_for


def _message(db: Path, agent: str, seq: object) -> tuple[str, int | None] | None:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        row = con.execute(
            "SELECT kind, batch FROM messages WHERE agent = ? AND seq = ?", (agent, seq)
        ).fetchone()
    finally:
        con.close()
    return None if row is None else (str(row[0]), row[1])


def _batch_of(db: Path, agent: str, seq: object) -> int | None:
    found = _message(db, agent, seq)
    return None if found is None else found[1]


def _kind_of(db: Path, agent: str, seq: object) -> str | None:
    found = _message(db, agent, seq)
    return None if found is None else found[0]


pytestmark = pytest.mark.integration


@pytest.fixture
def world(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Cleanroom]:
    with cleanroom(tmp_path, mosquitto) as w:
        yield w


def _describe(entries: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"  {e['id']:>4} {e['kind']:<16} {e['subject']:<10} {e['data_json'][:160]}" for e in entries
    )


def test_denied_process_ends_the_session_tree_and_audit_shows_report_decision_command_ack(
    world: Cleanroom,
) -> None:
    world.write_policy(heartbeat_s=2, end_grace_s=1.0)
    ctl = world.start_controller()
    postures = world.tap("cleanroom/v1/agents/it-agent/posture")
    session = world.spawn_client()
    assert session.child is not None, "the fake client should have a child process"
    world.add_agent("it-agent")
    world.wait_agent(
        "it-agent", timeout=30, what="it-agent online and compliant", online=True, compliant=True
    )
    world.wait_session(session.session_id, timeout=15, what="the session listed running", state="running")

    world.spawn_denied()
    denied = f"denied_process:{world.denied_name}"

    wait_for(
        lambda: not session.live_pids(),
        timeout=20,
        what=f"the session's process tree {session.tree_pids()} to be gone",
    )
    row = world.wait_agent("it-agent", timeout=10, what="it-agent judged non-compliant", compliant=False)
    assert denied in row["reasons"], f"reasons do not name the denied process: {row}"
    world.wait_session(session.session_id, timeout=15, what="the session recorded ended", state="ended")

    def chain() -> tuple[int, int, int, int] | None:
        """The four entries, each found by its own identity anywhere in the trail (never by searching
        after the previous one, which would make the order hold by construction): the decision naming
        the denied process and this session; the report that decision cites (the verdict of the posture
        with the seq in the decision's ``cause_seq``); the command for this session; its ended ack."""
        entries = audit_entries(ctl.db_path)
        data = [json.loads(e["data_json"]) for e in entries]
        decision = next(
            (
                i
                for i, e in enumerate(entries)
                if e["kind"] == "decision"
                and e["subject"] == "it-agent"
                and denied in data[i].get("reasons", [])
                and any(a.get("session") == session.session_id for a in data[i].get("actions", []))
            ),
            None,
        )
        command = next(
            (
                i
                for i, e in enumerate(entries)
                if e["kind"] == "command" and data[i].get("session_id") == session.session_id
            ),
            None,
        )
        if decision is None or command is None:
            return None
        cause = data[decision].get("cause_seq")
        # The cited report is covered by the verdict.batch entry its messages row names (sealed after it).
        covering = _batch_of(ctl.db_path, "it-agent", cause)
        report = next(
            (i for i, e in enumerate(entries) if e["kind"] == "verdict.batch" and e["id"] == covering),
            None,
        )
        command_id = data[command]["id"]
        ack = next(
            (
                i
                for i, e in enumerate(entries)
                if e["kind"] == "ack"
                and data[i].get("command_id") == command_id
                and data[i].get("result") == "ended"
            ),
            None,
        )
        if report is None or ack is None:
            return None
        return report, decision, command, ack

    found: tuple[int, int, int, int] | None
    try:
        found = wait_for(
            chain, timeout=15, what="report, decision, command and ended-ack entries in the audit trail"
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}\naudit trail:\n{_describe(audit_entries(ctl.db_path))}") from None
    assert found is not None
    report, decision, command, ack = found
    cause = json.loads(audit_entries(ctl.db_path)[decision]["data_json"])["cause_seq"]
    cited = {"kind": _kind_of(ctl.db_path, "it-agent", cause), "seq": cause}
    assert cited["kind"] == "posture", f"the decision cites {cited}, not a posture"
    cited_posture = next(
        m.envelope()["body"] for m in postures.on("it-agent/posture") if m.envelope()["seq"] == cited["seq"]
    )
    assert world.denied_name in {p["name"] for p in cited_posture["denied_processes"]}, (
        f"the posture the decision cites (seq {cited['seq']}) does not report the denied process"
    )
    assert decision < command < ack and decision < report, (
        f"audit out of order: report@{report} decision@{decision} command@{command} ack@{ack}\n"
        + _describe(audit_entries(ctl.db_path)[report : ack + 1])
    )
    verify = ctl.audit_verify()
    assert verify.returncode == 0, (
        f"audit verify failed on an untouched trail:\n{verify.stdout}{verify.stderr}"
    )
    ctl.assert_alive()
