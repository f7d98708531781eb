"""`enroll create|list|revoke`: the token printed once (stdout only), listed without its secret, revoked,
every step audited; and refused clearly without a PKI. The real CLI app over a real SQLite store and PKI."""

from __future__ import annotations

import json
import time
from pathlib import Path

from typer.testing import CliRunner

from cleanroom_controller import Store
from cleanroom_controller.cli import app
from cleanroom_controller.trust import Pki
from cleanroom_controller.trust.enrolment import parse_token, refusal

runner = CliRunner()


def cli(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    assert "Traceback" not in result.output
    return result.exit_code, result.stdout, result.stderr


def test_create_list_revoke(tmp_path: Path) -> None:
    data = tmp_path / "d"
    pki = Pki.init(data)
    code, out, err = cli(
        "enroll", "create", "--site", "manila", "--expires", "2h", "--uses", "2", "--data-dir", str(data)
    )
    assert code == 0, err
    token = parse_token(out.strip())
    assert token.ca_fingerprint == pki.ca_fingerprint.removeprefix("sha256:")
    assert token.secret not in err  # the secret goes to stdout only, for a file or a pipe
    code, out, _ = cli("enroll", "list", "--json", "--data-dir", str(data))
    (row,) = [json.loads(line) for line in out.splitlines()]
    assert (row["id"], row["site"], row["uses_allowed"], row["state"]) == (token.id, "manila", 2, "usable")
    assert token.secret not in out
    code, table, _ = cli("enroll", "list", "--data-dir", str(data))
    assert (
        code == 0 and time.strftime("%Y-%m-%d", time.gmtime(row["expires_at"])) in table
    )  # a date, not a float
    store = Store.open(data)
    assert refusal(store.token(token.id), token.secret, row["created_at"]) is None
    store.close()
    assert cli("enroll", "revoke", token.id, "--data-dir", str(data))[0] == 0
    code, _, err = cli("enroll", "revoke", token.id, "--data-dir", str(data))
    assert code == 2 and "no usable token" in err
    code, out, _ = cli("enroll", "list", "--json", "--data-dir", str(data))
    assert json.loads(out)["state"] == "revoked"
    store = Store.open(data)
    kinds = [(e.kind, e.subject) for e in store.audit_entries()]
    store.close()
    assert kinds == [("operator.enroll_create", token.id), ("operator.enroll_revoke", token.id)]


def test_create_without_a_pki_says_what_to_run(tmp_path: Path) -> None:
    code, out, err = cli("enroll", "create", "--data-dir", str(tmp_path / "none"))
    assert code == 2 and out == "" and "pki init" in err


def test_bad_lifetime_and_uses_are_named(tmp_path: Path) -> None:
    Pki.init(tmp_path / "d")
    code, _, err = cli("enroll", "create", "--expires", "forever", "--data-dir", str(tmp_path / "d"))
    assert code == 2 and "duration 'forever'" in err
    code, _, err = cli("enroll", "create", "--uses", "0", "--data-dir", str(tmp_path / "d"))
    assert code == 2 and "uses must be" in err
