"""Fallback exec control when fanotify is unavailable: the kernel proc connector announces every exec
(notify only, ~0.1 ms later) and a denied program is killed. The program has already started — it may
have done a little work — so the capture enforcer reports ``degraded`` while this is what it has.
Under heavy load the kernel can drop these messages (ENOBUFS); drops are counted.

Wire format (field-notes "Proc connector"): nlmsghdr ``=IHHII`` + cn_msg ``=IIIIHH`` + payload; to
subscribe send PROC_CN_MCAST_LISTEN; a proc_event starts at offset 36 as ``=IIQ`` (what, cpu,
timestamp) and for PROC_EVENT_EXEC (2) the pid and tgid follow at offset 52.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
from collections.abc import Callable

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_EVENT_EXEC = 2
NLMSG_DONE = 3
_NLMSGHDR = struct.Struct("=IHHII")
_CN_MSG = struct.Struct("=IIIIHH")
_EVENT_HEAD = struct.Struct("=IIQ")
_EXEC = struct.Struct("=ii")


def parse_exec_pids(data: bytes) -> list[int]:
    """The tgids of exec events in one datagram (several netlink messages may be packed)."""
    pids = []
    pos = 0
    while pos + _NLMSGHDR.size <= len(data):
        length = _NLMSGHDR.unpack_from(data, pos)[0]
        if length < _NLMSGHDR.size or pos + length > len(data):
            break
        body = pos + _NLMSGHDR.size + _CN_MSG.size
        if body + _EVENT_HEAD.size + _EXEC.size <= pos + length:
            what = _EVENT_HEAD.unpack_from(data, body)[0]
            if what == PROC_EVENT_EXEC:
                _pid, tgid = _EXEC.unpack_from(data, body + _EVENT_HEAD.size)
                pids.append(tgid)
        pos += (length + 3) & ~3
    return pids


def open_proc_connector() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind((os.getpid(), CN_IDX_PROC))
        payload = struct.pack("=I", PROC_CN_MCAST_LISTEN)
        cn = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(payload), 0) + payload
        sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(cn), NLMSG_DONE, 0, 0, os.getpid()) + cn)
    except OSError:
        sock.close()
        raise
    return sock


class ExecWatcher:
    """A thread reading exec notifications and handing each pid to ``on_exec`` (in that thread)."""

    def __init__(self, on_exec: Callable[[int], None]) -> None:
        self._on_exec = on_exec
        self._sock = open_proc_connector()
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="capture-procconn", daemon=True)
        self.dropped = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)
        self._sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _run(self) -> None:
        while True:
            r, _, _ = select.select([self._sock.fileno(), self._wake_r], [], [])
            if self._wake_r in r:
                return
            try:
                data = self._sock.recv(65536)
            except OSError:
                self.dropped += 1  # ENOBUFS: the kernel dropped notifications
                continue
            for pid in parse_exec_pids(data):
                try:
                    self._on_exec(pid)
                except Exception:
                    self.dropped += 1
