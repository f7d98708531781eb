"""Removable-media enforcer (policy ``[media]``): mounts under ``/media``, ``/run/media`` and the
policy's ``watch`` paths.

The mount table is watched through ``/proc/self/mountinfo`` (the kernel flags it POLLPRI on every mount
or unmount, so changes are seen at once without polling), with watchdog on the watched folders as a
second trigger. A new mount under a watched folder is ``media.mounted`` (the daemon's posture probe
lists it as a removable mount, so posture changes too); in enforce mode with ``unmount = true`` it is
unmounted at once (umount2, lazily if busy) and ``media.unmounted`` follows. Audit mode reports only.
Mounts present at start are judged the same way.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import select
import threading
import time
from dataclasses import dataclass
from typing import Any

from cleanroom_protocol import EnforcerState, Event, Mode, Policy, Severity

from .base import Enforcer, EventSink

MNT_DETACH = 2
_MAX_MOUNTINFO = 4 * 1024 * 1024


@dataclass(frozen=True)
class Mount:
    mount_id: int
    mountpoint: str
    fstype: str
    source: str
    read_only: bool


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \\ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    """``36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue``"""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        a, b = left.split(), right.split()
        if len(a) < 6 or len(b) < 2:
            continue
        try:
            mount_id = int(a[0])
        except ValueError:
            continue
        options = a[5].split(",")
        mounts.append(Mount(mount_id, _unescape(a[4]), b[0], _unescape(b[1]), "ro" in options))
    return mounts


def watched_dirs(policy: Policy) -> list[str]:
    dirs = {"/media", "/run/media", *policy.media.watch}
    return sorted(os.path.normpath(d) for d in dirs if d.startswith("/"))


def is_removable_mount(mountpoint: str, dirs: list[str]) -> bool:
    """Strictly below a watched folder (the folder itself may be a tmpfs of its own)."""
    return any(mountpoint.startswith(d.rstrip("/") + "/") for d in dirs)


def new_removable(before: dict[int, Mount], after: list[Mount], dirs: list[str]) -> list[Mount]:
    return [m for m in after if m.mount_id not in before and is_removable_mount(m.mountpoint, dirs)]


class MountTable:
    """The real mount table: read it, wait for a change, unmount."""

    def __init__(self, path: str = "/proc/self/mountinfo") -> None:
        self.path = path
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        self._umount2 = libc.umount2

    def read(self) -> list[Mount]:
        with open(self.path, encoding="utf-8", errors="replace") as f:
            return parse_mountinfo(f.read(_MAX_MOUNTINFO))

    def unmount(self, mountpoint: str) -> str | None:
        """None on success, else the error (EBUSY is retried lazily with MNT_DETACH)."""
        if self._umount2(mountpoint.encode(), 0) == 0:
            return None
        err = ctypes.get_errno()
        if self._umount2(mountpoint.encode(), MNT_DETACH) == 0:
            return None
        return os.strerror(ctypes.get_errno() or err)


class MediaEnforcer(Enforcer):
    name = "media"

    def __init__(self, emit: EventSink, *, table: MountTable | None = None) -> None:
        super().__init__(emit)
        self._table = table or MountTable()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._policy: Policy | None = None
        self._mode = Mode.ENFORCE
        self._known: dict[int, Mount] = {}
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = -1, -1
        self._stopping = False
        self._observer: Any = None
        self._rescan = threading.Event()
        self._lock = threading.Lock()

    async def _start(self, policy: Policy, mode: Mode) -> None:
        self._loop = asyncio.get_running_loop()
        self._policy, self._mode = policy, mode
        self._stopping = False
        try:
            mounts = await asyncio.to_thread(self._table.read)
        except OSError as exc:
            self._set_status(EnforcerState.UNSUPPORTED, f"cannot read {self._table.path}: {exc.strerror}")
            return
        # Mounts present at start are judged like new ones.
        await asyncio.to_thread(self._judge, mounts, {}, "present")
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._watch, name="media-mountinfo", daemon=True)
        self._thread.start()
        self._start_observer(policy)
        self._set_status(EnforcerState.ACTIVE)

    async def _apply(self, policy: Policy, mode: Mode) -> None:
        old = self._policy
        self._policy, self._mode = policy, mode
        if (
            old is None
            or watched_dirs(old) != watched_dirs(policy)
            or old.media.unmount != policy.media.unmount
        ):
            self._stop_observer()
            self._start_observer(policy)
            mounts = await asyncio.to_thread(self._table.read)
            await asyncio.to_thread(self._judge, mounts, {}, "policy")

    async def _stop(self) -> None:
        self._stopping = True
        self._stop_observer()
        if self._thread is not None:
            os.write(self._wake_w, b"x")
            await asyncio.to_thread(self._thread.join, 5)
            self._thread = None
            os.close(self._wake_r)
            os.close(self._wake_w)
        self._set_status(EnforcerState.OFF)

    # threads -------------------------------------------------------------------------------------
    def _watch(self) -> None:
        with open(self._table.path, "rb") as f:
            poller = select.poll()
            poller.register(f.fileno(), select.POLLPRI | select.POLLERR)
            poller.register(self._wake_r, select.POLLIN)
            while not self._stopping:
                events = poller.poll(1000)
                if any(fd == self._wake_r for fd, _ in events):
                    return
                if events or self._rescan.is_set():
                    self._rescan.clear()
                    f.seek(0)
                    f.read(_MAX_MOUNTINFO)  # re-arms POLLPRI
                    try:
                        mounts = self._table.read()
                    except OSError:
                        continue
                    with self._lock:
                        before = dict(self._known)
                    self._judge(mounts, before, "mount")

    def _judge(self, mounts: list[Mount], before: dict[int, Mount], source: str) -> None:
        policy = self._policy
        if policy is None:
            return
        dirs = watched_dirs(policy)
        current = {m.mount_id: m for m in mounts}
        for gone in [m for mid, m in before.items() if mid not in current]:
            if is_removable_mount(gone.mountpoint, dirs):
                self._hand_over("media.unmounted", gone, {"by": "other"})
        for mount in new_removable(before, mounts, dirs):
            self._hand_over("media.mounted", mount, {"source": source})
            if policy.media.unmount and self._mode is Mode.ENFORCE:
                error = self._table.unmount(mount.mountpoint)
                if error is None:
                    current.pop(mount.mount_id, None)
                    self._hand_over("media.unmounted", mount, {"by": "agent"})
                else:
                    self._hand_over("media.unmount_failed", mount, {"error": error})
        with self._lock:
            self._known = current

    def _hand_over(self, kind: str, mount: Mount, extra: dict[str, str]) -> None:
        details: dict[str, str | int | float | bool | None] = {
            "mountpoint": mount.mountpoint[:1024],
            "device": mount.source[:256],
            "fstype": mount.fstype[:64],
            "writable": not mount.read_only,
            "mode": self._mode.value,
            **extra,
        }
        event = Event(
            kind=kind,
            at=time.time(),
            severity=Severity.INFO if kind == "media.unmounted" else Severity.WARNING,
            blocked=kind == "media.unmounted" and extra.get("by") == "agent",
            details=details,
        )
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._emit, event)

    def _start_observer(self, policy: Policy) -> None:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        rescan = self._rescan

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                rescan.set()  # the mountinfo thread rescans on its next tick (≤ 1 s)

        observer = Observer()
        scheduled = 0
        for directory in watched_dirs(policy):
            if os.path.isdir(directory):
                observer.schedule(Handler(), directory, recursive=False)
                scheduled += 1
        if scheduled:
            observer.daemon = True
            observer.start()
            self._observer = observer

    def _stop_observer(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join(timeout=5)
