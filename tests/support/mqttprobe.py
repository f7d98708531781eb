"""One MQTT 3.1.1 CONNECT by hand, to ask a broker "would you admit this client?" and get the answer at
once: a CONNACK with return code 0 is admitted; a failed handshake, a closed or reset connection or a
refusing CONNACK is refused (with what happened). A real client library would only time out."""

from __future__ import annotations

import socket
import ssl
import struct
from dataclasses import dataclass


@dataclass(frozen=True)
class Answer:
    admitted: bool
    detail: str


def _connect_packet(client_id: str, keepalive: int = 10) -> bytes:
    ident = client_id.encode()
    variable = struct.pack("!H", 4) + b"MQTT" + bytes([4, 0x02]) + struct.pack("!H", keepalive)
    payload = struct.pack("!H", len(ident)) + ident
    body = variable + payload
    assert len(body) < 128, "one-byte remaining length"
    return bytes([0x10, len(body)]) + body


def probe(
    port: int,
    context: ssl.SSLContext | None,
    client_id: str,
    *,
    host: str = "127.0.0.1",
    server_hostname: str = "localhost",
    timeout: float = 5.0,
) -> Answer:
    """Connect (TLS with ``context``, plain TCP without), send CONNECT, read the CONNACK."""
    raw = socket.create_connection((host, port), timeout=timeout)
    sock: socket.socket = raw
    try:
        if context is not None:
            try:
                sock = context.wrap_socket(raw, server_hostname=server_hostname)
            except (ssl.SSLError, OSError) as exc:
                return Answer(False, f"handshake failed: {exc}")
        try:
            sock.sendall(_connect_packet(client_id))
            reply = b""
            while len(reply) < 4:
                chunk = sock.recv(4 - len(reply))
                if not chunk:
                    return Answer(False, f"closed by the broker after {len(reply)} bytes")
                reply += chunk
        except (ssl.SSLError, OSError) as exc:  # TLS 1.3: the refusal of a client certificate lands here
            return Answer(False, f"refused: {exc}")
        if reply[0] != 0x20:
            return Answer(False, f"not a CONNACK: {reply!r}")
        return Answer(reply[3] == 0, f"CONNACK return code {reply[3]}")
    finally:
        sock.close()
