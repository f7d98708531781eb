"""The ``pki/`` directory on disk: where each file lives, how files are written (whole: temp file, fsync,
rename; private keys 0600, the directory 0700), how secrets are read back (no symlink, owned by us, not
group/world-readable), and the lock that serialises changes between processes (the controller daemon
refreshing the CRL while an operator revokes a device)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from cleanroom_protocol import datafiles
from cleanroom_protocol.keys import MAX_KEY_FILE_BYTES, KeyFileError, read_private_file

from .certificates import PkiError
from .index import Index

PKI_DIR = "pki"
MAX_PUBLIC_FILE_BYTES = 4 * 1024 * 1024  # certificates, the CRL (a revoked serial is ~40 bytes in it)
MAX_INDEX_BYTES = 64 * 1024 * 1024


class PkiFiles:
    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def under(cls, data_dir: Path) -> PkiFiles:
        return cls(data_dir / PKI_DIR)

    # -- where things are ---------------------------------------------------------------------------
    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "broker.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "broker.key"

    @property
    def crl(self) -> Path:
        return self.root / "crl.pem"

    @property
    def index(self) -> Path:
        return self.root / "issued.json"

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

    def controller_cert(self, name: str) -> Path:
        return self.root / "controllers" / f"{name}.crt"

    def controller_key(self, name: str) -> Path:
        return self.root / "controllers" / f"{name}.key"

    # -- writing ------------------------------------------------------------------------------------
    def write_public(self, path: Path, data: bytes) -> None:
        write_whole(path, data, 0o644)

    def write_private(self, path: Path, data: bytes) -> None:
        write_whole(path, data, 0o600)

    def write_index(self, index: Index) -> None:
        write_whole(self.index, index.dumps(), 0o600)

    # -- reading ------------------------------------------------------------------------------------
    def read_private(self, path: Path, what: str) -> bytes:
        """A secret of the PKI, read safely (no symlink, mode 0600, owned by us). Root may also read one
        owned by the PKI's owner: `broker-config` runs as root (it hands files to the broker's user)
        while the PKI belongs to the controller's unprivileged user."""
        try:
            return read_private_file(path, what)
        except FileNotFoundError:
            raise PkiError(f"{path}: {what} is missing") from None
        except KeyFileError as exc:
            if os.geteuid() == 0 and "is owned by uid" in str(exc):
                return _read_private_as_root(path, what)
            raise PkiError(str(exc)) from None

    def read_public(self, path: Path, what: str, *, limit: int = MAX_PUBLIC_FILE_BYTES) -> bytes:
        try:
            with path.open("rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            raise PkiError(f"{path}: {what} is missing") from None
        except OSError as exc:
            raise PkiError(f"{path}: cannot read {what}: {exc.strerror}") from None
        if len(data) > limit:
            raise PkiError(f"{path}: {what} is larger than {limit} bytes")
        return data

    def read_index(self) -> Index:
        # Not a secret (CNs, serials, dates; kept 0600 in the 0700 directory all the same), and far larger
        # than a key file may be: ~200 bytes per certificate issued.
        raw = self.read_public(self.index, "issued-certificates index", limit=MAX_INDEX_BYTES)
        return Index.loads(raw, source=str(self.index))

    # -- the directory ------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.root.exists()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the PKI's change lock (an flock: released by the kernel if the holder dies)."""
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @classmethod
    def create(cls, data_dir: Path, fill: Callable[[PkiFiles], None]) -> PkiFiles:
        """A new ``pki/`` under ``data_dir``, filled by ``fill`` in a private temporary directory and then
        renamed into place: a crash leaves no half-made PKI, and an existing one is never touched."""
        final = cls.under(data_dir)
        if final.root.exists():
            raise PkiError(
                f"{final.root} already exists: refusing to replace the CA (every certificate it issued "
                "would stop working); remove the directory yourself to start over"
            )
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = data_dir / f".{PKI_DIR}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        tmp.mkdir(mode=0o700)
        try:
            fill(cls(tmp))
            datafiles.fsync_dir(tmp)
            try:
                # rename() replaces only an empty directory: a PKI made meanwhile by another process stays.
                if final.root.exists():
                    raise FileExistsError(final.root)
                tmp.rename(final.root)
            except OSError as exc:
                raise PkiError(f"{final.root}: appeared while creating the PKI; kept it ({exc})") from None
            datafiles.fsync_dir(data_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        os.chmod(final.root, 0o700)
        return final


def write_whole(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` whole: a temp file beside it (created with ``mode``), fsync, rename over,
    fsync the directory. A reader sees the old file or the new one, never a part. Written by root, the
    file (and any directory made for it) belongs to the owner of the directory it is in: an operator's
    `sudo cleanroom-controller pki …` must not leave the controller's user unable to read its own PKI."""
    make_dirs(path.parent)
    parent = os.stat(path.parent)
    owner = (parent.st_uid, parent.st_gid) if os.geteuid() == 0 else None
    datafiles.write_whole(path, data, mode, owner=owner)


def make_dirs(directory: Path) -> None:
    """``mkdir -p`` with mode 0700; as root, each new directory belongs to the owner of its parent."""
    if directory.is_dir():
        return
    make_dirs(directory.parent)
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700)
        if os.geteuid() == 0:
            owner = os.stat(directory.parent)
            os.chown(directory, owner.st_uid, owner.st_gid)


def _read_private_as_root(path: Path, what: str) -> bytes:
    """Root reading a secret of another user: the same checks as ``read_private_file`` but the owner's
    (no symlink, a regular file, mode 0600 or stricter, bounded), on the opened file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise PkiError(f"{path}: cannot read {what}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077:
            raise PkiError(f"{path}: {what} must be a regular file of mode 0600")
        data = f.read(MAX_KEY_FILE_BYTES + 1)
    if not data or len(data) > MAX_KEY_FILE_BYTES:
        raise PkiError(f"{path}: {what} is empty or larger than {MAX_KEY_FILE_BYTES} bytes")
    return data
