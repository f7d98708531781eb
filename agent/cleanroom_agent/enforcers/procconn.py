"""The kernel proc connector: exec and exit notifications over netlink (notify only, ~0.1 ms after the fact).

Two users: the capture enforcer's fallback exec control when fanotify is unavailable (:class:`ExecWatcher`:
a denied program is killed after it started — it may have done a little work — so capture reports
``degraded`` while this is what it has), and the agent's posture trigger (``procevents.py``). Under heavy
load the kernel can drop these messages (ENOBUFS); drops are counted.

Wire format (field-notes "Proc connector", linux/cn_proc.h): nlmsghdr ``=IHHII`` + cn_msg ``=IIIIHH`` +
payload; to subscribe send PROC_CN_MCAST_LISTEN; a proc_event starts at offset 36 as ``=IIQ`` (what, cpu,
timestamp) and for PROC_EVENT_EXEC (2) and PROC_EVENT_EXIT (0x80000000) ``process_pid, process_tgid``
follow at offset 52.

Every socket gets a classic BPF filter so the kernel drops what its reader does not want (forks, uid
changes, thread exits, ...) before it is queued: a fork storm neither wakes the reader nor fills its buffer.
"""

from __future__ import annotations

import ctypes
import os
import select
import socket
import struct
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_EVENT_EXEC = 0x00000002
PROC_EVENT_EXIT = 0x80000000
NLMSG_DONE = 3
SO_ATTACH_FILTER = 26  # asm-generic/socket.h (x86, arm, riscv); the socket module does not export it
_NLMSGHDR = struct.Struct("=IHHII")
_CN_MSG = struct.Struct("=IIIIHH")
_EVENT_HEAD = struct.Struct("=IIQ")
_PID_TGID = struct.Struct("=ii")
EVENT_OFFSET = _NLMSGHDR.size + _CN_MSG.size  # 36: ``what`` in the first message of a datagram
PID_OFFSET = EVENT_OFFSET + _EVENT_HEAD.size  # 52: process_pid, then process_tgid at 56
RECV_BYTES = 65536


@dataclass(frozen=True, slots=True)
class ProcEvent:
    """One exec or exit. ``pid`` is the thread, ``tgid`` the process (equal for a process's leader)."""

    what: int  # PROC_EVENT_EXEC or PROC_EVENT_EXIT
    pid: int
    tgid: int

    @property
    def is_exec(self) -> bool:
        return self.what == PROC_EVENT_EXEC

    @property
    def is_process_exit(self) -> bool:
        """The exit of a process's leader thread (a worker thread's exit changes no process)."""
        return self.what == PROC_EVENT_EXIT and self.pid == self.tgid


def parse_proc_events(data: bytes) -> list[ProcEvent]:
    """The exec and exit events in one datagram (several netlink messages may be packed); others skipped."""
    events = []
    pos = 0
    while pos + _NLMSGHDR.size <= len(data):
        length = _NLMSGHDR.unpack_from(data, pos)[0]
        if length < _NLMSGHDR.size or pos + length > len(data):
            break
        body = pos + EVENT_OFFSET
        if body + _EVENT_HEAD.size + _PID_TGID.size <= pos + length:
            what = _EVENT_HEAD.unpack_from(data, body)[0]
            if what in (PROC_EVENT_EXEC, PROC_EVENT_EXIT):
                pid, tgid = _PID_TGID.unpack_from(data, body + _EVENT_HEAD.size)
                events.append(ProcEvent(what, pid, tgid))
        pos += (length + 3) & ~3
    return events


def parse_exec_pids(data: bytes) -> list[int]:
    """The tgids of exec events in one datagram."""
    return [e.tgid for e in parse_proc_events(data) if e.is_exec]


# --- the kernel-side filter (classic BPF) ------------------------------------------------------------
_LD_W_ABS = 0x20  # A = ntohl(u32 at packet[k])
_LDX_MEM = 0x61  # X = M[k]
_ST = 0x02  # M[k] = A
_JEQ_K = 0x15  # if A == k
_JEQ_X = 0x1D  # if A == X
_RET_K = 0x06
_INSN = struct.Struct("=HBBI")


def _as_loaded(value: int) -> int:
    """A host-order u32 field as BPF's absolute load (network order) sees it."""
    return int.from_bytes(value.to_bytes(4, sys.byteorder), "big")


def proc_event_filter(*, exec_events: bool = True, exit_events: bool = False) -> bytes:
    """A socket filter passing exec events and/or process (leader) exits, dropping everything else.

    The kernel sends one event per message, so the first message's ``what`` at offset 36 decides; a
    load past the end of a short message makes the program drop it.
    """
    if not (exec_events or exit_events):
        raise ValueError("proc_event_filter: pass at least one of exec_events, exit_events")
    # (code, jump if true, jump if false, k) with jumps named "accept", "reject" or None (next insn).
    Jump = str | None
    program: list[tuple[int, Jump, Jump, int]] = [(_LD_W_ABS, None, None, EVENT_OFFSET)]
    if exec_events:
        program.append((_JEQ_K, "accept", None if exit_events else "reject", _as_loaded(PROC_EVENT_EXEC)))
    if exit_events:
        program += [
            (_JEQ_K, None, "reject", _as_loaded(PROC_EVENT_EXIT)),
            (_LD_W_ABS, None, None, PID_OFFSET + 4),  # process_tgid
            (_ST, None, None, 0),
            (_LD_W_ABS, None, None, PID_OFFSET),  # process_pid
            (_LDX_MEM, None, None, 0),
            (_JEQ_X, "accept", "reject", 0),  # the leader thread's exit is the process's exit
        ]
    reject = len(program)
    labels = {"reject": reject, "accept": reject + 1}

    def offset(at: int, target: Jump) -> int:
        return 0 if target is None else labels[target] - at - 1

    insns = [(code, offset(i, jt), offset(i, jf), k) for i, (code, jt, jf, k) in enumerate(program)]
    insns += [(_RET_K, 0, 0, 0), (_RET_K, 0, 0, 0xFFFFFFFF)]
    return b"".join(_INSN.pack(*insn) for insn in insns)


def attach_filter(sock: socket.socket, program: bytes) -> None:
    """SO_ATTACH_FILTER ``program`` (packed ``struct sock_filter`` array) to ``sock``; the kernel copies it."""
    count = len(program) // _INSN.size
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("HL", count, ctypes.addressof(buf))  # struct sock_fprog {u16 len; *filter}
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def open_proc_connector(
    *, exec_events: bool = True, exit_events: bool = False, rcvbuf: int = 4 << 20
) -> socket.socket:
    """A subscribed proc-connector socket receiving only the chosen events (needs root, init namespaces).

    Bound to port 0 (the kernel picks a unique port id) so several in one process do not collide.
    """
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        attach_filter(sock, proc_event_filter(exec_events=exec_events, exit_events=exit_events))
        sock.bind((0, CN_IDX_PROC))
        port = sock.getsockname()[0]
        payload = struct.pack("=I", PROC_CN_MCAST_LISTEN)
        cn = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(payload), 0) + payload
        sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(cn), NLMSG_DONE, 0, 0, port) + cn)
    except OSError:
        sock.close()
        raise
    return sock


class ExecWatcher:
    """A thread reading exec notifications and handing each pid to ``on_exec`` (in that thread)."""

    def __init__(self, on_exec: Callable[[int], None]) -> None:
        self._on_exec = on_exec
        self._sock = open_proc_connector(exec_events=True)
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
                data = self._sock.recv(RECV_BYTES)
            except OSError:
                self.dropped += 1  # ENOBUFS: the kernel dropped notifications
                continue
            for pid in parse_exec_pids(data):
                try:
                    self._on_exec(pid)
                except Exception:
                    self.dropped += 1
