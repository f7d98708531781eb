"""Pieces of the exec listeners that need no permission events: hashing through an fd with its cache,
finding denied files and the installed loaders on disk, and parsing proc-connector datagrams in the
kernel's layout."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

from cleanroom_agent.enforcers.capture import find_denied_files, find_loaders
from cleanroom_agent.enforcers.fanotify import HashCache, exec_filesystems, sha256_of_fd
from cleanroom_agent.enforcers.procconn import parse_exec_pids


def test_hash_cache_hashes_once_and_again_after_a_change(tmp_path: Path) -> None:
    path = tmp_path / "tool"
    path.write_bytes(b"one")
    cache = HashCache(size=2)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert sha256_of_fd(fd, 3) == hashlib.sha256(b"one").hexdigest()
        first, second = cache.get(fd, os.fstat(fd)), cache.get(fd, os.fstat(fd))
        assert first == second == hashlib.sha256(b"one").hexdigest()
        assert (cache.hits, cache.misses) == (1, 1)
        assert cache.cached(os.fstat(fd)) == (True, hashlib.sha256(b"one").hexdigest())
    finally:
        os.close(fd)
    path.write_bytes(b"two!")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert cache.cached(os.fstat(fd)) == (False, None)  # changed: not answered from the cache
        assert cache.get(fd, os.fstat(fd)) == hashlib.sha256(b"two!").hexdigest()
    finally:
        os.close(fd)


def test_find_denied_files_follows_symlinks(tmp_path: Path) -> None:
    real = tmp_path / "import-im6.q16"
    real.write_bytes(b"binary")
    (tmp_path / "import").symlink_to(real)
    found = find_denied_files(["import", "absent"], (str(tmp_path),))
    assert [(k.name, k.path, k.size) for k in found] == [("import", str(real), 6)]


def test_installed_loaders_found_with_their_content_hash() -> None:
    loaders = {k.path: k for k in find_loaders()}
    real = os.path.realpath("/lib64/ld-linux-x86-64.so.2")
    assert {"/lib64/ld-linux-x86-64.so.2", real} <= loaders.keys()
    content = Path(real).read_bytes()
    assert loaders["/lib64/ld-linux-x86-64.so.2"].sha256 == hashlib.sha256(content).hexdigest()
    assert loaders[real].size == len(content)


def test_parse_proc_connector_exec_events() -> None:
    def message(what: int, pid: int) -> bytes:
        event = struct.pack("=IIQ", what, 0, 123) + struct.pack("=ii", pid, pid)
        cn = struct.pack("=IIIIHH", 1, 1, 0, 0, len(event), 0) + event
        return struct.pack("=IHHII", 16 + len(cn), 3, 0, 0, 0) + cn

    data = message(2, 4242) + message(1, 7) + message(2, 99)  # exec, fork, exec
    assert parse_exec_pids(data) == [4242, 99]
    assert parse_exec_pids(b"\x01\x00") == []


def test_exec_filesystems_once_per_device_local_types_only_names_decoded() -> None:
    mountinfo = (
        "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
        "30 27 0:25 / /dev/shm rw,nosuid - tmpfs tmpfs rw\n"
        "31 27 254:0 /srv /mnt/bind\\040copy rw - ext4 /dev/vda rw\n"  # a bind mount of the root fs
        "32 27 0:40 / /mnt/my\\040stick rw shared:5 - vfat /dev/sdb1 rw\n"
        "33 27 0:41 / /mnt/remote rw - nfs4 srv:/x rw\n"
        "34 27 0:42 / /home/u/.cache/fuse rw - fuse.sshfs host: rw\n"
        "35 27 0:5 / /proc rw - proc proc rw\n"
    )
    assert exec_filesystems(mountinfo) == [
        ("254:0", "/", "ext4"),
        ("0:25", "/dev/shm", "tmpfs"),
        ("0:40", "/mnt/my stick", "vfat"),
    ]
