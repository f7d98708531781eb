"""The CLI: enrolment, the list commands' JSON lines, audit verify exit codes, clear errors without tracebacks."""

from __future__ import annotations

import json
import re
import sqlite3
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from cleanroom_controller import Store
from cleanroom_controller.cli import app
from cleanroom_protocol import Event, Kind, public_key_pem

from .helpers import Sender, posture, session, wired_ingest

runner = CliRunner()


def cli(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    assert "Traceback" not in result.output
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A data dir with one enrolled agent that reported a posture with a session and an event."""
    d = tmp_path / "data"
    a1 = Sender("a1")
    pem = tmp_path / "a1.pem"
    pem.write_text(public_key_pem(a1.key))
    code, _, err = cli("agents", "add", "a1", "--public-key", str(pem), "--data-dir", str(d))
    assert code == 0, err
    store = Store.open(d)
    ingest = wired_ingest(store)
    ingest.handle("cleanroom/v1/agents/a1/posture", a1.seal(Kind.POSTURE, posture(sessions=(session(),))))
    ingest.handle(
        "cleanroom/v1/agents/a1/events", a1.seal(Kind.EVENT, Event(kind="usb.blocked", at=time.time()))
    )
    store.close()
    return d


def lines(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_list_commands_print_one_json_object_per_line(data_dir: Path) -> None:
    code, out, _ = cli("agents", "list", "--json", "--data-dir", str(data_dir))
    assert code == 0
    (agent,) = lines(out)
    assert {"id", "online", "compliant", "reasons", "last_seen"} <= agent.keys()
    assert (agent["id"], agent["online"], agent["compliant"], agent["reasons"]) == ("a1", True, True, [])

    code, out, _ = cli("sessions", "list", "--json", "--data-dir", str(data_dir))
    (s,) = lines(out)
    assert {"id": "s-100-1", "agent": "a1", "state": "running", "ended_reason": None}.items() <= s.items()

    code, out, _ = cli("events", "list", "--json", "--data-dir", str(data_dir))
    (e,) = lines(out)
    assert (e["agent"], e["kind"], e["seq"]) == ("a1", "usb.blocked", 2)
    assert isinstance(e["ts"], float)


def test_tables_without_json(data_dir: Path) -> None:
    store = Store.open(data_dir)
    store.count_reject("(unenrolled)", "unknown_sender", 1.0)
    store.close()
    wide = runner.invoke(app, ["agents", "list", "--data-dir", str(data_dir)], env={"COLUMNS": "200"})
    code, out = wide.exit_code, wide.stdout  # ten columns: at 80 their headers fold
    assert code == 0
    assert "a1" in out
    assert "compliant" in out
    assert '"(unenrolled)": {"unknown_sender": 1}' in out
    code, out, _ = cli("agents", "list", "--json", "--data-dir", str(data_dir))
    assert [row["id"] for row in lines(out)] == ["a1"]


def test_audit_verify_exit_codes(data_dir: Path) -> None:
    code, out, _ = cli("audit", "verify", "--data-dir", str(data_dir))
    assert code == 0, out
    assert "intact" in out
    db = sqlite3.connect(data_dir / "controller.db", isolation_level=None)
    db.execute("DROP TRIGGER audit_no_update")
    db.execute("UPDATE audit SET subject = 'someone-else' WHERE id = 2")
    code, out, _ = cli("audit", "verify", "--data-dir", str(data_dir))
    assert code == 1
    assert "audit entry 2: edited" in out
    code, out, _ = cli("audit", "verify", "--json", "--data-dir", str(data_dir))
    assert {k: v for k, v in json.loads(out).items() if k in ("ok", "entry", "tamper", "detail")} == {
        "ok": False,
        "entry": 2,
        "tamper": "edited",
        "detail": "its content no longer matches its hash",
    }


def test_enrolment_is_audited_and_user_mistakes_are_clear_errors(tmp_path: Path, data_dir: Path) -> None:
    audit = list(Store.open(data_dir).audit_entries())
    assert audit[0].kind == "operator.agents_add"
    assert audit[0].actor.startswith("operator:")

    other = tmp_path / "other.pem"
    other.write_text(public_key_pem(Ed25519PrivateKey.generate()))
    code, _, err = cli("agents", "add", "a1", "--public-key", str(other), "--data-dir", str(data_dir))
    assert code == 2
    assert "already enrolled with another key" in err
    code, _, err = cli("agents", "add", "a/1", "--public-key", str(other), "--data-dir", str(data_dir))
    assert code == 2
    assert "invalid agent id" in err
    code, _, err = cli(
        "agents", "add", "a2", "--public-key", str(tmp_path / "nope.pem"), "--data-dir", str(data_dir)
    )
    assert code == 2
    assert "nope.pem" in err
    code, _, err = cli("agents", "list", "--data-dir", str(tmp_path / "empty"))
    assert code == 2
    assert "no controller database" in err
    code, _, err = cli("run", "--data-dir", str(tmp_path / "r"), "--policy", str(tmp_path / "missing.toml"))
    assert code == 2
    assert "missing.toml" in err


def test_identity_creates_a_private_key_0600(tmp_path: Path) -> None:
    code, out, _ = cli("identity", "--data-dir", str(tmp_path))
    assert code == 0
    assert out.startswith("-----BEGIN PUBLIC KEY-----")
    assert (tmp_path / "controller.key").stat().st_mode & 0o777 == 0o600
    assert cli("identity", "--data-dir", str(tmp_path))[1] == out


def test_agents_list_shows_the_spool_of_the_latest_posture(tmp_path: Path) -> None:
    """``spool_full`` and ``spool_refused`` come from each endpoint's latest posture, as the real ingest
    stored it: a later posture replaces them; an endpoint with no posture yet shows them unknown, not
    "not full". Both in ``--json`` and in the table."""
    d = tmp_path / "data"
    senders = {a: Sender(a) for a in ("full", "drained", "silent")}
    for agent, sender in senders.items():
        pem = tmp_path / f"{agent}.pem"
        pem.write_text(public_key_pem(sender.key))
        assert cli("agents", "add", agent, "--public-key", str(pem), "--data-dir", str(d))[0] == 0
    store = Store.open(d)
    ingest = wired_ingest(store)

    def report(agent: str, *, full: bool, refused: int) -> None:
        body = posture(agent).model_copy(update={"spool_full": full, "spool_refused": refused})
        ingest.handle(f"cleanroom/v1/agents/{agent}/posture", senders[agent].seal(Kind.POSTURE, body))

    report("full", full=True, refused=7)
    report("drained", full=True, refused=3)
    report("drained", full=False, refused=5)  # the latest posture is what is shown
    store.close()

    code, out, _ = cli("agents", "list", "--json", "--data-dir", str(d))
    assert code == 0
    shown = {r["id"]: (r["spool_full"], r["spool_refused"], r["compliant"]) for r in lines(out)}
    assert shown == {
        "full": (True, 7, False),  # spool_full is a violation: judged non-compliant
        "drained": (False, 5, True),
        "silent": (None, None, False),
    }
    table = runner.invoke(app, ["agents", "list", "--data-dir", str(d)], env={"COLUMNS": "200"})
    assert table.exit_code == 0, table.output
    cut = [
        [c.strip() for c in re.split("[│┃]", line)[1:-1]]
        for line in table.stdout.splitlines()
        if line.startswith(("│", "┃"))
    ]
    header = cut[0]
    assert header[-3:] == ["spool_full", "spool_refused", "rejects"], header
    cells = {r[0]: dict(zip(header, r, strict=True)) for r in cut[1:]}
    assert (cells["full"]["spool_full"], cells["full"]["spool_refused"]) == ("yes", "7")
    assert (cells["drained"]["spool_full"], cells["drained"]["spool_refused"]) == ("no", "5")
    assert (cells["silent"]["spool_full"], cells["silent"]["spool_refused"]) == ("-", "-")
