"""Ed25519 key files: private keys are created 0600 whole (temp file, fsync, link) and never overwritten,
read without following symlinks and only when owned by this user and not group/world-readable; public
keys are PEM."""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import os
import secrets
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .datafiles import fsync_dir


class KeyFileError(Exception):
    """A key file is missing, unreadable, of the wrong type or too open."""


MAX_KEY_FILE_BYTES = 64 * 1024


def load_or_create_private_key(path: Path) -> tuple[Ed25519PrivateKey, bool]:
    """Load the key at ``path``, creating it (mode 0600, parent 0700) on first use.

    Returns the key and whether it was created now. A new key is written whole to a temporary file beside
    ``path``, fsynced, then linked into place: a crash leaves either no key or a complete one (never an
    empty file that would stop every later start), and of two processes starting at once exactly one key
    wins (``link`` fails when the name exists, where ``rename`` would replace it).
    """
    try:
        return _load_existing_private_key(path), False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return _load_existing_private_key(path), False  # another process created it first: use theirs
        fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return key, True


def read_private_file(path: Path, what: str = "private key") -> bytes:
    """The bytes of a secret file, opened without following a symlink and checked on the opened file
    (no stat-then-open race): a regular file, owned by this process's user, mode 0600 or stricter.
    Raises FileNotFoundError when it does not exist, KeyFileError naming the file otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise KeyFileError(f"{path}: {what} is a symbolic link; refusing to follow it") from exc
        raise KeyFileError(f"{path}: cannot read {what}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{path}: {what} is not a regular file")
        if st.st_uid != os.geteuid():
            raise KeyFileError(
                f"{path}: {what} is owned by uid {st.st_uid}, not by this process (uid {os.geteuid()})"
            )
        mode = st.st_mode & 0o777
        if mode & 0o077:
            raise KeyFileError(f"{path}: {what} is mode {mode:04o}; it must be 0600 (chmod 600 {path})")
        data = f.read(MAX_KEY_FILE_BYTES + 1)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{path}: {what} is larger than {MAX_KEY_FILE_BYTES} bytes")
    if not data:
        raise KeyFileError(f"{path}: {what} is empty; remove it to create a new one")
    return data


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        return _load_existing_private_key(path)
    except FileNotFoundError as exc:
        raise KeyFileError(f"{path}: cannot read private key: no such file") from exc


def _load_existing_private_key(path: Path) -> Ed25519PrivateKey:
    """Raises FileNotFoundError when there is no key, KeyFileError for any other problem."""
    data = read_private_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except ValueError as exc:
        raise KeyFileError(f"{path}: not a PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read public key: {exc.strerror}") from exc
    return parse_public_key(data, source=str(path))


def parse_public_key(data: bytes, *, source: str = "public key") -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise KeyFileError(f"{source}: not a PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{source}: not an Ed25519 public key")
    return key


def public_key_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def fingerprint(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """Short, stable identifier of a public key (``SHA256:`` + base64 like OpenSSH)."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode("ascii").rstrip("=")
