"""The local launch socket: JSON lines over a unix socket, one request → one response.

Mode 0666 so any local user can ask to launch a VDI client; the kernel tells us who asks (SO_PEERCRED)
and that uid is what gets recorded. Requests are bounded in size, count per connection, time and rate.

Requests and responses (one JSON object per line, at most ``MAX_LINE`` bytes):
  {"op": "launch_check", "client": "xfreerdp"}
      → {"ok": true, "allowed": bool, "reasons": [...], "audit_only": bool}
  {"op": "register", "pid": 1234}
      → {"ok": true, "session": "s-1234-..."}  (the pid must belong to the asking uid, or the asker is root)
  {"op": "posture"}
      → {"ok": true, "posture": {...}}
  anything else / bad JSON / too long → {"ok": false, "error": "..."}
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

MAX_LINE = 4096
MAX_REQUESTS_PER_CONNECTION = 16
READ_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 32

log = structlog.get_logger("cleanroom_agent.localsock")


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int


Handler = Callable[[dict[str, Any], Peer], Awaitable[dict[str, Any]]]


class TokenBucket:
    """At most ``rate`` per second on average, bursts up to ``burst``. Pure apart from the clock it is given."""

    def __init__(self, rate: float, burst: int, now: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self._now = rate, burst, now
        self._tokens = float(burst)
        self._last = now()

    def take(self) -> bool:
        now = self._now()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


def peer_of(sock: socket.socket) -> Peer:
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", data)
    return Peer(pid, uid, gid)


class LocalSocketServer:
    def __init__(self, path: Path, handler: Handler, *, rate: float = 20.0, burst: int = 40) -> None:
        self.path = path
        self._handler = handler
        self._bucket = TokenBucket(rate, burst)
        self._connections = 0
        self.rejected = 0

    async def serve(self) -> None:
        """Listen until cancelled; the socket file is removed on the way out."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        server = await asyncio.start_unix_server(self._connection, path=str(self.path), limit=MAX_LINE)
        os.chmod(self.path, 0o666)  # noqa: S103 - users must reach the gate; the peer uid is checked per request
        try:
            async with server:
                await server.serve_forever()
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections += 1
        try:
            sock = writer.get_extra_info("socket")
            peer = peer_of(sock)
            if self._connections > MAX_CONNECTIONS:
                await self._reply(writer, {"ok": False, "error": "busy"})
                return
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
            self._connections -= 1
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _answer(self, line: bytes, peer: Peer) -> dict[str, Any]:
        if not self._bucket.take():
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

    def request(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(str(self.path))
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
