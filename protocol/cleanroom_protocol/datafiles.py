"""Data directories 0700, data files 0600: the agent's and the controller's SQLite databases hold session
ids, user names, paths and the audit trail, and their directories hold the private keys.

A data directory is created 0700. An existing one that this user owns but that is open to its group or to
others is *tightened* to 0700, with a warning naming the old mode: it is ours, the fix is safe and
nothing else can depend on reading our database (the systemd units already ask for 0700, so this meets
directories made by hand or by an older version). A directory owned by another user is *refused*: whoever
owns it can swap the files in it, and we must not chmod what is not ours. Files are treated alike: created
0600, tightened when ours, refused when not. SQLite creates a database's ``-wal`` and ``-shm`` files with
the database file's own mode, so a database created 0600 here keeps them 0600 too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from pathlib import Path

log = logging.getLogger("cleanroom.datafiles")

DIR_MODE = 0o700
FILE_MODE = 0o600
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


class DataFileError(OSError):
    """A data directory or file that cannot be made private (owned by another user, not a directory...)."""


def secure_dir(path: Path) -> list[str]:
    """Make ``path`` an existing directory of mode 0700 owned by this user; return what was changed."""
    try:
        path.mkdir(mode=DIR_MODE)
    except FileExistsError:
        pass
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)  # the parents with the usual modes, ours 0700
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=DIR_MODE)
    st = path.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise DataFileError(f"{path}: the data directory is not a directory")
    return _tighten(path, st, DIR_MODE, "data directory")


def secure_file(path: Path) -> list[str]:
    """Make ``path`` a regular file of mode 0600 owned by this user, created empty when missing."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    except FileExistsError:
        return secure_existing_file(path)
    os.close(fd)
    return []


def secure_existing_file(path: Path) -> list[str]:
    """Tighten ``path`` to 0600 if it exists (a database's side files); return what was changed."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return []
    if not stat.S_ISREG(st.st_mode):
        raise DataFileError(f"{path}: not a regular file (a symbolic link or a special file); refusing it")
    return _tighten(path, st, FILE_MODE, "data file")


def secure_database(path: Path) -> list[str]:
    """The data directory of the SQLite database ``path``, the file and any side files it has, private.

    Call before connecting, so that SQLite opens a 0600 file and derives its side files' modes from it."""
    changes = secure_dir(path.parent)
    changes += secure_file(path)
    for suffix in SQLITE_SIDE_FILES:
        changes += secure_existing_file(path.with_name(path.name + suffix))
    return changes


def _tighten(path: Path, st: os.stat_result, mode: int, what: str) -> list[str]:
    if st.st_uid != os.geteuid():
        raise DataFileError(
            f"{path}: the {what} is owned by uid {st.st_uid}, not by this process (uid {os.geteuid()}); "
            f"its owner could replace what is in it: chown it to uid {os.geteuid()} or use another one"
        )
    current = stat.S_IMODE(st.st_mode)
    if not current & 0o077:
        return []
    os.chmod(path, current & mode)
    change = f"{path}: {what} was mode {current:04o}, open to its group or others; now {current & mode:04o}"
    log.warning("tightened %s", change)
    return [change]


def write_whole(path: Path, data: bytes, mode: int, *, owner: tuple[int, int] | None = None) -> None:
    """Write ``data`` to ``path`` whole: a temp file beside it (created with ``mode``, never through a
    symlink), fsync, rename over, fsync the directory. A reader (or a crash) sees the old file or the new
    one, never a part. ``owner``: (uid, gid) to give the file, when root writes for another user."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            if owner is not None:
                os.fchown(f.fileno(), *owner)
            os.fchmod(f.fileno(), mode)  # the umask must not widen or narrow it
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename or link in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
