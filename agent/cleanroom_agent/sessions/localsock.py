"""The local launch socket: JSON lines over a unix socket, one request → one response.

Mode 0666 so any local user can ask to launch a VDI client. The kernel tells us who asks: the peer's
pid, uid and gid (``SO_PEERCRED``), its supplementary groups (``SO_PEERGROUPS``) and a pidfd of the
connecting process (``SO_PEERPIDFD``, Linux ≥ 6.5; older kernels: ``pidfd_open`` of the peer pid). Nothing a
request says about who is asking is believed.

Bounds: a request line is at most ``MAX_LINE`` bytes, a connection carries at most
``MAX_REQUESTS_PER_CONNECTION`` requests and is closed after ``READ_TIMEOUT_S`` idle. Every peer uid has
its own budget — a token bucket for requests and at most ``MAX_CONNECTIONS_PER_UID`` open connections —
so one user flooding the socket exhausts only their own budget, never another user's launch. At most
``MAX_TRACKED_UIDS`` uids are tracked; an idle uid whose bucket is full is forgotten to make room (it
loses nothing), and while every tracked uid is busy a new uid is answered ``busy``.

Requests and responses (one JSON object per line; errors are ``{"ok": false, "error": "..."}``):
  {"op": "launch", "client": "xfreerdp"}
      → {"ok": true, "allowed": bool, "reasons": [...], "audit_only": bool, "client_args": [...],
         "session": "s-<pid>-<ms>" | null}
      The launch gate in one step: judged on a fresh posture and, if allowed, the *asking process itself*
      (the peer pid, verified through its pidfd) is registered as the pending session of that client. The
      caller then execs the client in the same process (``cleanroom-agent launch`` does), so the session
      exists in the agent before the client runs. A pending pid that is not running the client
      ``PENDING_EXEC_S`` later is dropped.
  {"op": "launch_check", "client": "xfreerdp"}
      → {"ok": true, "allowed": bool, "reasons": [...], "audit_only": bool, "client_args": [...]}
      Read-only: would a launch be allowed now? Registers nothing, emits no event.
  {"op": "register", "pid": 1234}
      → refused: registering a pid after it started would mark a client as launched through the gate that
      never passed it (the check and the start were two steps). Use ``launch``.
  {"op": "posture"}
      → {"ok": true, "posture": {...}}  for root or members of the ``admin_group`` setting only (it names
      users, sessions and pids).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import json
import os
import platform
import signal
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import structlog

MAX_LINE = 4096
MAX_REQUESTS_PER_CONNECTION = 16
READ_TIMEOUT_S = 10.0
MAX_CONNECTIONS_PER_UID = 8
MAX_TRACKED_UIDS = 128
ACCEPT_BACKLOG = 512
# Launching a VDI client is human-paced; every launch is an event in the outbox.
RATE_PER_UID = 2.0
BURST_PER_UID = 20
PENDING_EXEC_S = 5.0
MAX_GROUPS = 65536  # NGROUPS_MAX

# asm-generic values; the architectures listed use them. Elsewhere these options are not used:
# no supplementary groups (only the primary gid counts: fail closed) and pidfd_open of the peer pid.
_GENERIC_SOCKOPT_ARCHES = (
    "x86_64", "i386", "i686", "aarch64", "arm64", "armv7l", "armv6l", "riscv64", "ppc64le", "ppc64",
    "s390x", "loongarch64",
)  # fmt: skip
_GENERIC = platform.machine() in _GENERIC_SOCKOPT_ARCHES
SO_PEERGROUPS = 59 if _GENERIC else None
SO_PEERPIDFD = 77 if _GENERIC else None

log = structlog.get_logger("cleanroom_agent.sessions.localsock")


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is on the other end, as the kernel says."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()  # supplementary groups at connect time
    # Create time (psutil's clock) of the process ``pid``, checked to be the connecting process; None when
    # it is gone or cannot be told apart from a later process that reuses the pid.
    start_time: float | None = None


Handler = Callable[[dict[str, Any], Peer], Awaitable[dict[str, Any]]]


class TokenBucket:
    """At most ``rate`` per second on average, bursts up to ``burst``. Pure apart from the clock it is given."""

    def __init__(self, rate: float, burst: int, now: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self._now = rate, burst, now
        self._tokens = float(burst)
        self._last = now()

    def _refill(self) -> None:
        now = self._now()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now

    def take(self) -> bool:
        self._refill()
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    def has(self) -> bool:
        """Is a token there (without taking it)?"""
        self._refill()
        return self._tokens >= 1

    def full(self) -> bool:
        self._refill()
        return self._tokens >= self.burst


@dataclass
class _UidBudget:
    bucket: TokenBucket
    connections: int = 0


class PeerBudgets:
    """A request bucket and a connection cap per uid, for a bounded number of uids. Pure apart from the
    clock it is given.

    A uid is forgotten only when forgetting loses nothing (no open connection, bucket full again), so
    making room never hands a flooder a fresh budget."""

    def __init__(
        self,
        *,
        rate: float = RATE_PER_UID,
        burst: int = BURST_PER_UID,
        max_connections: int = MAX_CONNECTIONS_PER_UID,
        max_uids: int = MAX_TRACKED_UIDS,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate, self.burst = rate, burst
        self.max_connections, self.max_uids = max_connections, max_uids
        self._now = now
        self._budgets: dict[int, _UidBudget] = {}

    def open(self, uid: int) -> str | None:
        """Take a connection slot for ``uid``; None when granted, else why not."""
        budget = self._budgets.get(uid)
        if budget is None:
            if len(self._budgets) >= self.max_uids and not self._forget_one():
                return "busy"
            budget = self._budgets[uid] = _UidBudget(TokenBucket(self.rate, self.burst, self._now))
        if budget.connections >= self.max_connections:
            return "busy"
        if not budget.bucket.has():  # refused cheaply, before the connection costs anything more
            return "rate limited"
        budget.connections += 1
        return None

    def close(self, uid: int) -> None:
        budget = self._budgets.get(uid)
        if budget is not None and budget.connections > 0:
            budget.connections -= 1

    def take(self, uid: int) -> bool:
        """One request of ``uid`` (which holds an open connection)."""
        budget = self._budgets.get(uid)
        return budget is not None and budget.bucket.take()

    def tracked(self) -> int:
        return len(self._budgets)

    def _forget_one(self) -> bool:
        for uid, budget in self._budgets.items():
            if budget.connections == 0 and budget.bucket.full():
                del self._budgets[uid]
                return True
        return False


# --- who is asking -----------------------------------------------------------------------------------


def peer_of(sock: socket.socket) -> Peer:
    """pid, uid, gid from SO_PEERCRED (what the kernel recorded at connect)."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", data)
    return Peer(pid, uid, gid)


def peer_groups(sock: socket.socket) -> tuple[int, ...]:
    """Supplementary groups of the peer at connect time (SO_PEERGROUPS); () when the kernel cannot say."""
    if SO_PEERGROUPS is None:
        return ()
    for size in (256, MAX_GROUPS):
        try:
            data = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size * 4)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                continue  # more groups than the buffer holds: once more with room for the maximum
            return ()
        return tuple(struct.unpack(f"{len(data) // 4}I", data[: len(data) // 4 * 4]))
    return ()


def _peer_pidfd(sock: socket.socket, pid: int) -> int | None:
    if SO_PEERPIDFD is not None:
        try:
            return sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
        except OSError as exc:
            if exc.errno != errno.ENOPROTOOPT:  # ENOPROTOOPT: kernel < 6.5, below; else the peer is gone
                return None
    # Only the pid is known: a peer that exited before this call could have handed its pid to another
    # process. That needs the pid space to wrap meanwhile; the honest peer waits for our answer.
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def peer_start_time(sock: socket.socket, pid: int) -> float | None:
    """Create time of the connecting process, or None. Read by pid, then the pidfd (which names the
    connecting process itself) shows it still runs: a live process's pid is not reused, so what was read
    belongs to it."""
    if pid <= 0:  # not visible in our pid namespace
        return None
    pidfd = _peer_pidfd(sock, pid)
    if pidfd is None:
        return None
    try:
        started = psutil.Process(pid).create_time()
        signal.pidfd_send_signal(pidfd, 0)
    except (psutil.Error, OSError):
        return None
    finally:
        os.close(pidfd)
    return started


# --- who may do what -----------------------------------------------------------------------------------


def resolve_group(name: str) -> int:
    """The gid of the ``admin_group`` setting (a group name or a number); ValueError names what is wrong."""
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ValueError(f"admin_group {name!r}: no such group") from None


def may_read_posture(peer: Peer, admin_gid: int | None) -> bool:
    """Posture names users, sessions and pids: root, or a member of the admin group (primary or
    supplementary, as the kernel recorded them at connect)."""
    if peer.uid == 0:
        return True
    return admin_gid is not None and (peer.gid == admin_gid or admin_gid in peer.groups)


# --- the server ----------------------------------------------------------------------------------------


class LocalSocketServer:
    def __init__(
        self,
        path: Path,
        handler: Handler,
        *,
        rate: float = RATE_PER_UID,
        burst: int = BURST_PER_UID,
        max_connections_per_uid: int = MAX_CONNECTIONS_PER_UID,
        max_uids: int = MAX_TRACKED_UIDS,
    ) -> None:
        self.path = path
        self._handler = handler
        self.budgets = PeerBudgets(
            rate=rate, burst=burst, max_connections=max_connections_per_uid, max_uids=max_uids
        )
        self.rejected = 0

    async def serve(self) -> None:
        """Listen until cancelled; the socket file is removed on the way out."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        server = await asyncio.start_unix_server(
            self._connection, path=str(self.path), limit=MAX_LINE, backlog=ACCEPT_BACKLOG
        )
        os.chmod(self.path, 0o666)  # noqa: S103 - users must reach the gate; the peer is checked per request
        try:
            async with server:
                await server.serve_forever()
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        uid: int | None = None
        try:
            sock = writer.get_extra_info("socket")
            peer = peer_of(sock)
            refused = self.budgets.open(peer.uid)
            if refused is not None:
                self.rejected += 1
                await self._reply(writer, {"ok": False, "error": refused})
                return
            uid = peer.uid
            peer = Peer(peer.pid, peer.uid, peer.gid, peer_groups(sock), peer_start_time(sock, peer.pid))
            for _ in range(MAX_REQUESTS_PER_CONNECTION):
                try:
                    line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT_S)
                except (ValueError, asyncio.LimitOverrunError):
                    self.rejected += 1
                    await self._reply(writer, {"ok": False, "error": f"request longer than {MAX_LINE} bytes"})
                    return
                except TimeoutError:
                    return
                if not line:
                    return
                await self._reply(writer, await self._answer(line, peer))
        except (ConnectionError, OSError) as exc:
            log.debug("local_socket_connection_error", error=str(exc))
        finally:
            if uid is not None:
                self.budgets.close(uid)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _answer(self, line: bytes, peer: Peer) -> dict[str, Any]:
        if not self.budgets.take(peer.uid):
            self.rejected += 1
            return {"ok": False, "error": "rate limited"}
        try:
            request = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            self.rejected += 1
            return {"ok": False, "error": "request is not JSON"}
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            self.rejected += 1
            return {"ok": False, "error": 'request must be a JSON object with "op"'}
        try:
            return await self._handler(request, peer)
        except Exception as exc:  # a bad request must never take the daemon down
            log.exception("local_socket_handler_failed", op=request.get("op"))
            return {"ok": False, "error": f"internal error: {type(exc).__name__}"}

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, response: dict[str, Any]) -> None:
        writer.write(json.dumps(response, separators=(",", ":")).encode() + b"\n")
        await writer.drain()


class AgentUnreachable(Exception):
    """No agent answers on the socket."""


class LocalSocketClient:
    """Blocking client used by ``cleanroom-agent launch``."""

    def __init__(self, path: Path, timeout: float = 15.0) -> None:
        self.path = path
        self.timeout = timeout

    def _connect(self, sock: socket.socket) -> None:
        # A connect with a Python timeout is non-blocking underneath, and a unix socket whose accept queue
        # is full answers that with EAGAIN at once: a flood by another user would fail our launch. A
        # blocking connect bounded by SO_SNDTIMEO waits for room instead.
        seconds = int(self.timeout)
        micros = int((self.timeout - seconds) * 1_000_000)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", seconds, micros))
        sock.connect(str(self.path))
        sock.settimeout(self.timeout)

    def request(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                self._connect(sock)
                with contextlib.suppress(BrokenPipeError):
                    # An agent that refuses at once ("busy") answers and closes before reading: its answer
                    # is still there to read.
                    sock.sendall(json.dumps(request).encode() + b"\n")
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                    if len(buf) > 4 * 1024 * 1024:
                        raise AgentUnreachable(f"{self.path}: response too large")
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise AgentUnreachable(f"no agent is running at {self.path} ({exc.strerror})") from exc
        except OSError as exc:
            raise AgentUnreachable(f"{self.path}: {exc}") from exc
        try:
            response = json.loads(buf)
        except json.JSONDecodeError as exc:
            raise AgentUnreachable(f"{self.path}: agent sent no valid answer") from exc
        if not isinstance(response, dict):
            raise AgentUnreachable(f"{self.path}: agent sent no valid answer")
        return response
