"""fanotify exec guard: runs in its OWN small process (stdlib only), started by capture.py.

Why a process of its own: every exec on the machine waits for this listener's answer. Inside the agent it
would share the GIL with the event loop, the MQTT client and subprocess spawning, and one stall there
would freeze exec system-wide. Alone it only reads, decides and answers. It never execs (it would wait
on its own permission event), it answers every event even when deciding fails (unknown → allow,
matched → deny), and when it dies its fanotify fd closes and the kernel allows whatever was pending.
It dies with the agent: PR_SET_PDEATHSIG, and EOF on its control pipe.

Control (JSON lines): the agent writes ``{"rules": {...}}`` to its stdin (execrules.ExecRules.to_dict),
``{"stats": true}`` to ask for counters. It writes ``{"ready": true}``, ``{"error": "..."}``,
``{"event": {...}}`` and ``{"stats": {...}}`` to stdout, non-blocking: a report that does not fit in the
pipe is dropped and counted, never waited for.

Marks: ``FAN_OPEN_EXEC_PERM`` on every local filesystem an exec can come from (``FAN_MARK_FILESYSTEM``
on each superblock of a type in ``EXEC_FILESYSTEMS`` found in the mount table, so also its bind mounts and
its copies in other mount namespaces; the mount table is watched with POLLPRI and new filesystems are
marked as they are mounted: a renamed tool in ``/dev/shm`` or on a tmpfs mounted later is judged like one in
``/usr/bin``), and ``FAN_OPEN_PERM`` inode marks on the denied files (their plain opens, to catch ``ld-linux… /path/tool``; only the loader is denied). The opener
is the loader when its executable's path, name or content is a loader's (a copy under another name is
hashed, once per file thanks to the cache).
Facts measured on this machine: see field-notes "fanotify".
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import select
import signal
import struct
import sys
import time
from collections import OrderedDict
from typing import Any

from .execrules import (
    ExecRules,
    ExecVerdict,
    InterpreterTracker,
    elf_interpreter,
    file_name,
    judge_exec,
    judge_open,
    loader_match,
)
from .ratelimit import EventBudget

FAN_CLOEXEC = 0x01
FAN_NONBLOCK = 0x02
FAN_CLASS_CONTENT = 0x04
FAN_MARK_ADD = 0x01
FAN_MARK_MOUNT = 0x10
FAN_MARK_FILESYSTEM = 0x100
FAN_MARK_FLUSH = 0x80
FAN_OPEN_PERM = 0x00010000
FAN_OPEN_EXEC_PERM = 0x00040000
FAN_Q_OVERFLOW = 0x00004000
FAN_ALLOW = 0x01
FAN_DENY = 0x02
FAN_NOFD = -1
AT_FDCWD = -100
O_LARGEFILE = 0o100000
METADATA = struct.Struct("=IBBHQii")
RESPONSE = struct.Struct("=iI")
MAX_HASH_BYTES = 128 * 1024 * 1024  # every exec waits while a file is hashed: bound it
MAX_OPEN_MARKS = 1024
READ_BUFFER = 64 * 1024


# Filesystems whose execs are judged: local, kernel-backed ones (fapolicyd's watch_fs list, plus the
# overlay, squashfs and removable-media types). Network and FUSE filesystems are left out on purpose: a
# permission event waiting on a userspace or remote server can deadlock the machine.
EXEC_FILESYSTEMS = frozenset(
    {
        "ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "zfs", "tmpfs", "ramfs", "overlay", "squashfs",
        "vfat", "exfat", "ntfs3", "ntfs", "iso9660", "udf",
    }
)  # fmt: skip


def exec_filesystems(mountinfo: str) -> list[tuple[str, str, str]]:
    """Pure: (device major:minor, a mount point, fstype) once per filesystem in EXEC_FILESYSTEMS, from the
    text of ``/proc/self/mountinfo`` (mount points decoded from their octal escapes)."""
    seen: dict[str, tuple[str, str, str]] = {}
    for line in mountinfo.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if not sep or len(fields) < 5 or not rest:
            continue
        device, point, fstype = fields[2], fields[4], rest[0]
        if fstype in EXEC_FILESYSTEMS and device not in seen:
            decoded = point.encode().decode("unicode_escape").encode("latin-1").decode("utf-8", "replace")
            seen[device] = (device, decoded, fstype)
    return list(seen.values())


class FanotifyUnavailable(OSError):
    pass


def _libc() -> ctypes.CDLL:
    # The symbols already linked into this process: ctypes.util.find_library would run `ldconfig -p` in a
    # subprocess and import subprocess, tempfile and shutil to do it (1.4 MB of this small process).
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
    libc.fanotify_init.restype = ctypes.c_int
    libc.fanotify_mark.argtypes = [
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_uint64,
        ctypes.c_int,
        ctypes.c_char_p,
    ]
    libc.fanotify_mark.restype = ctypes.c_int
    return libc


class Fanotify:
    """The fanotify group fd and its marks."""

    def __init__(self) -> None:
        self._libc = _libc()
        fd = self._libc.fanotify_init(
            FAN_CLASS_CONTENT | FAN_CLOEXEC | FAN_NONBLOCK, os.O_RDONLY | O_LARGEFILE | os.O_CLOEXEC
        )
        if fd < 0:
            err = ctypes.get_errno()
            raise FanotifyUnavailable(err, f"fanotify_init: {os.strerror(err)}")
        self.fd = fd
        self.exec_devices: set[str] = set()  # major:minor of the filesystems whose execs are judged
        self.open_marks: set[str] = set()
        # (dev, inode) of the marked files: the listener must never open one itself (its open would
        # wait for its own answer).
        self.marked_inodes: set[tuple[int, int]] = set()

    def _mark(self, flags: int, mask: int, path: str | None) -> None:
        arg = path.encode() if path is not None else None
        if self._libc.fanotify_mark(self.fd, flags, mask, AT_FDCWD, arg) < 0:
            err = ctypes.get_errno()
            raise FanotifyUnavailable(err, f"fanotify_mark {path}: {os.strerror(err)}")

    def watch_exec(self, mount: str = "/") -> None:
        self._mark(FAN_MARK_ADD | FAN_MARK_MOUNT, FAN_OPEN_EXEC_PERM, mount)

    def watch_exec_filesystems(self, mountinfo: str) -> list[str]:
        """Mark every exec-capable filesystem of the mount table not marked yet; returns what could not be
        marked (as "mount point: reason"). Idempotent: called again on every mount-table change."""
        problems = []
        for device, point, _fstype in exec_filesystems(mountinfo):
            if device in self.exec_devices:
                continue
            try:
                self._mark(FAN_MARK_ADD | FAN_MARK_FILESYSTEM, FAN_OPEN_EXEC_PERM, point)
            except OSError:
                try:  # kernels before 4.20 have no filesystem marks: the mount is the next best thing
                    self._mark(FAN_MARK_ADD | FAN_MARK_MOUNT, FAN_OPEN_EXEC_PERM, point)
                except OSError as exc:
                    problems.append(f"{point}: {exc.strerror or exc}")
                    continue
            self.exec_devices.add(device)
        return problems

    def watch_opens(self, paths: tuple[str, ...] | list[str]) -> None:
        """Replace the inode marks for plain opens with ``paths`` (bounded)."""
        self._mark(FAN_MARK_FLUSH, 0, None)  # without FAN_MARK_MOUNT: flushes inode marks only
        self.open_marks.clear()
        self.marked_inodes.clear()
        for path in paths:
            self.add_open_mark(path)

    def add_open_mark(self, path: str) -> None:
        if path in self.open_marks or len(self.open_marks) >= MAX_OPEN_MARKS:
            return
        try:
            # O_PATH: no open event (no permission hooks run), and the mark and the recorded inode are
            # the same file even if the path is replaced meanwhile.
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return  # the file went away
        try:
            st = os.fstat(fd)
            # Through the magic link: resolves to exactly the O_PATH fd's file (fanotify_mark with a
            # NULL path refuses O_PATH fds).
            self._mark(FAN_MARK_ADD, FAN_OPEN_PERM, f"/proc/self/fd/{fd}")
            self.open_marks.add(path)
            self.marked_inodes.add((st.st_dev, st.st_ino))
        except OSError:
            pass
        finally:
            os.close(fd)

    def close(self) -> None:
        os.close(self.fd)  # pending permission events are allowed by the kernel


def sha256_of_fd(fd: int, size: int) -> str | None:
    """Hash through the event's own fd with pread: no new open, so no event of our own."""
    if size > MAX_HASH_BYTES:
        return None
    digest = hashlib.sha256()
    offset = 0
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            return digest.hexdigest()
        digest.update(chunk)
        offset += len(chunk)


class HashCache:
    """SHA-256 by (dev, inode, mtime, size, ctime): a changed file is hashed again. Bounded LRU."""

    def __init__(self, size: int = 8192) -> None:
        self._size = size
        self._entries: OrderedDict[tuple[int, int, int, int, int], str | None] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def cached(self, st: os.stat_result) -> tuple[bool, str | None]:
        """(known, hash) without hashing: for a file the listener has no fd of."""
        key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size, st.st_ctime_ns)
        if key in self._entries:
            self._entries.move_to_end(key)
            self.hits += 1
            return True, self._entries[key]
        return False, None

    def get(self, fd: int, st: os.stat_result) -> str | None:
        key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size, st.st_ctime_ns)
        if key in self._entries:
            self._entries.move_to_end(key)
            self.hits += 1
            return self._entries[key]
        self.misses += 1
        value = sha256_of_fd(fd, st.st_size)
        self._entries[key] = value
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return value


class Listener:
    def __init__(self, fan: Fanotify, out_fd: int, in_fd: int) -> None:
        self.fan = fan
        self.out_fd = out_fd
        self.in_fd = in_fd
        self.rules = ExecRules()
        self.cache = HashCache()
        self.interpreters = InterpreterTracker()
        self.budget = EventBudget(rate_per_s=20.0, burst=100)
        self.stats = {
            "events": 0,
            "denied": 0,
            "allowed": 0,
            "errors": 0,
            "dropped_reports": 0,
            "overflows": 0,
        }
        self._inbuf = b""
        self._unjudged: list[str] = []
        self._pid = os.getpid()
        self._last_report: tuple[int, str] | None = None

    # control pipe ------------------------------------------------------------------------------
    def send(self, message: dict[str, Any]) -> None:
        data = (json.dumps(message, separators=(",", ":")) + "\n").encode()
        try:
            os.write(self.out_fd, data)
        except OSError:  # full pipe (never wait for the agent) or the agent is gone
            self.stats["dropped_reports"] += 1

    def on_control(self) -> bool:
        """Read control lines; False on EOF (the agent is gone)."""
        try:
            chunk = os.read(self.in_fd, 1 << 20)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        self._inbuf += chunk
        if len(self._inbuf) > 16 << 20:
            self._inbuf = b""  # a runaway writer: drop, keep the rules in force
        while b"\n" in self._inbuf:
            line, self._inbuf = self._inbuf.split(b"\n", 1)
            try:
                message = json.loads(line)
                if "rules" in message:
                    self.rules = ExecRules.from_dict(message["rules"])
                    self.fan.watch_opens(self.rules.open_marks)
                    # The agent reports the policy as enforced only once this arrives.
                    self.send({"applied": message.get("gen", True)})
                if message.get("stats"):
                    self.send(
                        {
                            "stats": {
                                **self.stats,
                                "hash_hits": self.cache.hits,
                                "hash_misses": self.cache.misses,
                                "marks": len(self.fan.open_marks),
                                "exec_filesystems": len(self.fan.exec_devices),
                            }
                        }
                    )
            except (ValueError, TypeError, KeyError, OSError) as exc:
                self.send({"warning": f"bad control message: {exc}"})
        return True

    # fanotify ----------------------------------------------------------------------------------
    def on_events(self) -> None:
        try:
            buf = os.read(self.fan.fd, READ_BUFFER)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno in (errno.EINTR, errno.EAGAIN):
                return
            raise
        pos = 0
        while pos + METADATA.size <= len(buf):
            event_len, _vers, _res, _mlen, mask, fd, pid = METADATA.unpack_from(buf, pos)
            if event_len < METADATA.size:
                break
            pos += event_len
            self.stats["events"] += 1
            if fd == FAN_NOFD:
                if mask & FAN_Q_OVERFLOW:
                    self.stats["overflows"] += 1
                continue
            self.answer(fd, pid, mask)

    def answer(self, fd: int, pid: int, mask: int) -> None:
        response = FAN_ALLOW  # unknown → allow
        try:
            verdict, path, sha, extra = self.decide(fd, pid, mask)
            if verdict.deny and self.rules.enforce:
                response = FAN_DENY
            if verdict.deny and verdict.matched in ("name", "sha256"):
                self.learn(path)  # not for allowlist denials: those depend on the user
            if verdict.deny:
                self.report(verdict, path, sha, pid, mask, extra, denied=response == FAN_DENY)
        except Exception as exc:
            self.stats["errors"] += 1
            self.send({"warning": f"decision failed, allowed: {type(exc).__name__}: {exc}"})
        finally:
            try:
                os.write(self.fan.fd, RESPONSE.pack(fd, response))
            except OSError:
                self.stats["errors"] += 1
            os.close(fd)
            self.stats["denied" if response == FAN_DENY else "allowed"] += 1

    def decide(self, fd: int, pid: int, mask: int) -> tuple[ExecVerdict, str, str | None, dict[str, str]]:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if pid == self._pid:
            return ExecVerdict(False, "self"), path, None, {}
        st = os.fstat(fd)
        name = file_name(path)
        rules = self.rules
        by_name = name in rules.deny_names or name.lower() in rules.deny_names
        sha = None
        if not by_name and (rules.needs_hash(st.st_size) or rules.may_be_loader(st.st_size)):
            # A file of a loader's size is hashed when executed, so a copied loader's later opens are
            # judged from the cache, without opening its file again.
            sha = self.cache.get(fd, st)
        if mask & FAN_OPEN_EXEC_PERM:
            return self.decide_exec(fd, st, pid, path, sha), path, sha, {"via": "exec"}
        opener = self.exe_of(pid)
        loader_by = None
        if opener is not None:
            loader_by = loader_match(rules, opener, None) or loader_match(rules, opener, self.exe_hash(pid))
        if sha is None and loader_by is not None:
            sha = self.cache.get(fd, st)
        return (
            judge_open(rules, path, sha, opener, loader_by),
            path,
            sha,
            {"via": "loader", "opener": opener or ""},
        )

    def decide_exec(self, fd: int, st: os.stat_result, pid: int, path: str, sha: str | None) -> ExecVerdict:
        rules = self.rules
        if not rules.allowlist:
            return judge_exec(rules, path, sha, None)
        try:
            uid: int | None = os.stat(f"/proc/{pid}").st_uid
        except OSError:
            uid = None
        if sha is None and rules.allow_hashes:
            sha = self.cache.get(fd, st)
        if uid is None or uid < rules.session_uid_min:
            return judge_exec(rules, path, sha, uid)
        # A session user under the allowlist: the loader may only be the interpreter the kernel loads for
        # the program allowed just before (its PT_INTERP), never a program run directly.
        if path.removesuffix(" (deleted)") in rules.loader_paths:
            as_interpreter = self.interpreters.is_interpreter_load(
                pid, lambda interp: self.same_file(pid, interp, st)
            )
            return judge_exec(rules, path, sha, uid, as_interpreter=as_interpreter)
        verdict = judge_exec(rules, path, sha, uid)
        interpreter = None
        if not verdict.deny:
            head = os.pread(fd, 1024, 0)
            interpreter = elf_interpreter(head, lambda offset, size: os.pread(fd, size, offset))
        self.interpreters.program_allowed(pid, interpreter)
        return verdict

    @staticmethod
    def same_file(pid: int, interpreter: str, st: os.stat_result) -> bool:
        """Whether the path a program names as its interpreter is this file (resolved as the kernel
        does, from the process's working directory; a stat, never an open)."""
        where = interpreter if interpreter.startswith("/") else f"/proc/{pid}/cwd/{interpreter}"
        try:
            named = os.stat(where)
        except OSError:
            return False
        return (named.st_dev, named.st_ino) == (st.st_dev, st.st_ino)

    @staticmethod
    def exe_of(pid: int) -> str | None:
        try:
            return os.readlink(f"/proc/{pid}/exe")
        except OSError:
            return None

    def exe_hash(self, pid: int) -> str | None:
        """SHA-256 of a process's executable when its size is a loader's (else None): from the cache
        (filled when it was executed), else read through ``/proc/<pid>/exe``, unless that file carries
        one of our open marks (opening it would wait on ourselves: a deadlock)."""
        try:
            st = os.stat(f"/proc/{pid}/exe")
        except OSError:
            return None
        if not self.rules.may_be_loader(st.st_size):
            return None
        known, value = self.cache.cached(st)
        if known:
            return value
        if (st.st_dev, st.st_ino) in self.fan.marked_inodes:
            return None
        try:
            fd = os.open(f"/proc/{pid}/exe", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            opened = os.fstat(fd)
            if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
                return None  # the process exec'd something else meanwhile
            return self.cache.get(fd, opened)
        finally:
            os.close(fd)

    def learn(self, path: str) -> None:
        """A file denied by name or hash gets an open mark, so a loader invocation of it is denied too.
        Its hash is deliberately NOT added to the deny list: a user who copies /bin/bash to ~/scrot must
        not get every bash on the machine denied. Hashes come from the agent: the policy's and those of
        the denied tools installed in system directories."""
        if not path.endswith(" (deleted)"):
            self.fan.add_open_mark(path)

    def report(
        self,
        verdict: ExecVerdict,
        path: str,
        sha: str | None,
        pid: int,
        mask: int,
        extra: dict[str, str],
        *,
        denied: bool,
    ) -> None:
        if (pid, path) == self._last_report:
            return  # the same exec retried along PATH (/usr/bin and /bin are one directory)
        self._last_report = (pid, path)
        suppressed = self.budget.take()
        if suppressed is None:
            return
        try:
            with open(f"/proc/{pid}/comm", "rb") as f:  # the process trying (its old image for exec)
                process = f.read(64).decode("utf-8", "replace").strip()
        except OSError:
            process = ""
        self.send(
            {
                "event": {
                    "kind": "exec.denied" if denied else "exec.detected",
                    "path": path[:1024],
                    "name": file_name(path)[:255],
                    "sha256": sha,
                    "reason": verdict.reason[:512],
                    "matched": verdict.matched,
                    "pid": pid,
                    "process": process,
                    "suppressed_before": suppressed,
                    "at": time.time(),
                    **extra,
                }
            }
        )

    def on_mounts_changed(self, mountinfo_fd: int) -> None:
        """A mount appeared or went: mark the new filesystems (a tmpfs mounted to run a renamed tool)."""
        try:
            os.lseek(mountinfo_fd, 0, os.SEEK_SET)
            text = read_all(mountinfo_fd)
        except OSError as exc:
            self.send({"warning": f"mount table unreadable: {exc}"})
            return
        self.report_unjudged(self.fan.watch_exec_filesystems(text))

    def report_unjudged(self, problems: list[str]) -> None:
        """Filesystems that should be marked but could not be: the agent reports capture degraded."""
        if problems or self._unjudged:
            self._unjudged = problems
            self.send({"unjudged": problems[:32]})

    def run(self, mountinfo_fd: int | None = None) -> None:
        poller = select.poll()
        poller.register(self.fan.fd, select.POLLIN)
        poller.register(self.in_fd, select.POLLIN | select.POLLHUP)
        if mountinfo_fd is not None:
            poller.register(mountinfo_fd, select.POLLPRI | select.POLLERR)
        while True:
            for fd, flags in poller.poll():
                if fd == self.fan.fd:
                    self.on_events()
                elif fd == mountinfo_fd:
                    self.on_mounts_changed(fd)
                elif flags & (select.POLLIN | select.POLLHUP) and not self.on_control():
                    return


def read_all(fd: int) -> str:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


def listener_main() -> int:
    """Entry point of the listener process (see capture.py for how it is started)."""
    libc = _libc()
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong]
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the agent
    out_fd, in_fd = sys.stdout.fileno(), sys.stdin.fileno()
    os.set_blocking(out_fd, False)
    os.set_blocking(in_fd, False)
    if os.getppid() == 1:
        return 1  # the agent is already gone
    try:
        fan = Fanotify()
        listener = Listener(fan, out_fd, in_fd)
        # Rules first (blocking read of the first line), then the mount mark: no window with empty rules.
        os.set_blocking(in_fd, True)
        first = sys.stdin.buffer.readline()
        os.set_blocking(in_fd, False)
        if not first:
            return 1
        listener.rules = ExecRules.from_dict(json.loads(first)["rules"])
        fan.watch_opens(listener.rules.open_marks)
        fan.watch_exec("/")  # the root mount at least, whatever the mount table says
        mountinfo_fd = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
        problems = fan.watch_exec_filesystems(read_all(mountinfo_fd))
    except (OSError, ValueError, KeyError) as exc:
        os.set_blocking(out_fd, True)
        os.write(out_fd, (json.dumps({"error": str(exc)}) + "\n").encode())
        return 2
    listener.send({"ready": True})
    listener.report_unjudged(problems)
    try:
        listener.run(mountinfo_fd)
    finally:
        fan.close()
    return 0


# How capture.py starts this file without importing the agent package (which pulls in pydantic, Xlib,
# … and 50 MB): a synthetic package pointing at this directory, then this module inside it. Run with
# `python -I -S`: no site-packages, no .pth files, stdlib only (tests/agent/test_footprint.py holds it to that).
BOOTSTRAP = (
    "import sys,types;p=types.ModuleType('cleanroom_enforcers');p.__path__=[sys.argv[1]];"
    "sys.modules['cleanroom_enforcers']=p;import cleanroom_enforcers.fanotify as f;sys.exit(f.listener_main())"
)
