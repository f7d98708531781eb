"""The controller's data stay private: its data directory 0700, controller.db (and its -wal/-shm),
controller.key 0600, checked on the files real CLI processes create; an open data directory of ours is
tightened with a warning, one owned by another user refused with a clear error."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cleanroom_protocol import public_key_pem

CLI = str(Path(sys.executable).parent / "cleanroom-controller")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    # The usual umask: without the fix, SQLite creates controller.db 0644 under it.
    return subprocess.run(
        [CLI, *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        preexec_fn=lambda: os.umask(0o022),  # only umask() between fork and exec
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_data_directory_and_its_files_are_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    pem = tmp_path / "a1.pem"
    pem.write_text(public_key_pem(Ed25519PrivateKey.generate()))
    assert cli("identity", "--data-dir", str(data)).returncode == 0
    added = cli("agents", "add", "a1", "--public-key", str(pem), "--data-dir", str(data))
    assert added.returncode == 0, added.stderr
    # The CLI closed its connection (SQLite removes -wal and -shm then): open one that writes, as the
    # daemon does, and see the side files SQLite creates take the database file's mode.
    db = sqlite3.connect(data / "controller.db")
    try:
        db.execute("INSERT INTO meta (key, value) VALUES ('probe', '1')")
        db.commit()
        files = {p.name: mode(p) for p in data.iterdir()}
    finally:
        db.close()
    assert mode(data) == 0o700
    assert files == dict.fromkeys(
        ("controller.key", "controller.db", "controller.db-wal", "controller.db-shm"), 0o600
    )


def test_an_open_data_directory_of_ours_is_tightened_with_a_warning(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o755)
    sqlite3.connect(data / "controller.db").close()  # as an older version left it
    (data / "controller.db").chmod(0o644)
    listed = cli("agents", "list", "--json", "--data-dir", str(data))
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout == ""  # no agents; the warning stays off stdout, which scripts parse
    assert f"{data}: data directory was mode 0755" in listed.stderr
    assert f"{data / 'controller.db'}: data file was mode 0644" in listed.stderr
    assert (mode(data), mode(data / "controller.db")) == (0o700, 0o600)


def test_a_data_directory_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    sqlite3.connect(data / "controller.db").close()
    os.chown(data, 65534, 65534)
    data.chmod(0o755)
    listed = cli("agents", "list", "--data-dir", str(data))
    assert listed.returncode == 2
    assert "owned by uid 65534" in listed.stderr and str(data) in listed.stderr.replace("\n", "")
    assert "Traceback" not in listed.stderr
    assert mode(data) == 0o755  # not ours to change
