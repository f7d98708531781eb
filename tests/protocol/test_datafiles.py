"""Data directories 0700 and data files 0600, checked on real files: created so, an open one of ours
tightened, one owned by another user refused with a clear error."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

from cleanroom_protocol.datafiles import DataFileError, secure_database, secure_dir


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_database_its_side_files_and_its_directory_are_private(tmp_path: Path) -> None:
    db_path = tmp_path / "new" / "data" / "x.db"
    old_umask = os.umask(0o022)  # the usual umask, under which SQLite alone creates 0644 files
    try:
        assert secure_database(db_path) == []
        db = sqlite3.connect(db_path)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE t (x)")
        db.execute("INSERT INTO t VALUES (1)")
        db.commit()
    finally:
        os.umask(old_umask)
    try:
        assert mode(db_path.parent) == 0o700
        assert {p.name: mode(p) for p in db_path.parent.iterdir()} == {
            "x.db": 0o600,
            "x.db-wal": 0o600,
            "x.db-shm": 0o600,
        }
    finally:
        db.close()


def test_an_open_directory_and_database_of_ours_are_tightened(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    for name in ("x.db", "x.db-wal", "x.db-shm"):
        (data / name).touch()
        (data / name).chmod(0o644)
    changes = secure_database(data / "x.db")
    assert len(changes) == 4 and "was mode 0755" in changes[0] and str(data) in changes[0]
    assert mode(data) == 0o700
    assert {p.name: mode(p) for p in data.iterdir()} == dict.fromkeys(("x.db", "x.db-wal", "x.db-shm"), 0o600)
    assert secure_database(data / "x.db") == []  # nothing left to change


def test_a_directory_owned_by_another_user_is_refused_not_changed(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "these tests run as root (make test)"
    data = tmp_path / "theirs"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    os.chown(data, 65534, 65534)
    with pytest.raises(DataFileError, match=r"owned by uid 65534, not by this process \(uid 0\)") as raised:
        secure_dir(data)
    assert str(data) in str(raised.value)
    assert mode(data) == 0o755


def test_a_symlink_in_place_of_a_database_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (tmp_path / "elsewhere.db").touch()
    (data / "x.db").symlink_to(tmp_path / "elsewhere.db")
    with pytest.raises(DataFileError, match="not a regular file"):
        secure_database(data / "x.db")
