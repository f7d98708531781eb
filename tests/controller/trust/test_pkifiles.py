"""How the PKI's files are written and read back: whole, private, and owned by the PKI's owner even when
an operator runs a `pki` command as root."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cleanroom_controller.trust import PkiError, PkiFiles
from cleanroom_controller.trust.pkifiles import write_whole

NOBODY = 65534


def test_whole_write_replaces_atomically_with_the_mode_asked(tmp_path: Path) -> None:
    target = tmp_path / "d" / "ca.key"
    write_whole(target, b"one", 0o600)
    write_whole(target, b"two", 0o600)
    assert target.read_bytes() == b"two"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o700
    assert [p.name for p in target.parent.iterdir()] == ["ca.key"]  # no temp file left


def test_secret_behind_a_symlink_is_refused(tmp_path: Path) -> None:
    files = PkiFiles(tmp_path)
    write_whole(tmp_path / "real.key", b"secret", 0o600)
    (tmp_path / "ca.key").symlink_to(tmp_path / "real.key")
    with pytest.raises(PkiError, match="symbolic link"):
        files.read_private(files.ca_key, "CA key")


@pytest.mark.root
def test_root_writes_keep_the_pki_owned_by_its_owner(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "ownership across users: runs as root (make test)"
    pki_dir = tmp_path / "pki"
    pki_dir.mkdir(mode=0o700)
    os.chown(pki_dir, NOBODY, NOBODY)
    write_whole(pki_dir / "controllers" / "ingest-2.key", b"secret", 0o600)
    for path in (pki_dir / "controllers", pki_dir / "controllers" / "ingest-2.key"):
        assert (path.stat().st_uid, path.stat().st_gid) == (NOBODY, NOBODY), path


@pytest.mark.root
def test_root_reads_a_secret_of_the_pki_owner_but_not_an_open_one(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "ownership across users: runs as root (make test)"
    files = PkiFiles(tmp_path)
    write_whole(files.ca_key, b"secret", 0o600)
    os.chown(files.ca_key, NOBODY, NOBODY)
    assert files.read_private(files.ca_key, "CA key") == b"secret"
    os.chmod(files.ca_key, 0o644)
    with pytest.raises(PkiError, match="0600"):
        files.read_private(files.ca_key, "CA key")
