"""What a VDI client connects to, read from its arguments (pure): the desktop's address, the user name it
logs on with, and Horizon's desktop name. A password argument is never read, kept or reported (``/p:``,
``/password:``, ``-p``, ``--password``…: its value is skipped, not parsed), nor is anything else.

| client | address | user | desktop name |
| --- | --- | --- | --- |
| ``xfreerdp``, ``xfreerdp3``, ``wlfreerdp`` | ``/v:HOST[:PORT]`` (``/port:N``) | ``/u:USER`` (``/d:DOMAIN`` → ``DOMAIN\\USER``) | — |
| ``remote-viewer`` | ``spice://HOST:PORT``, ``spice://HOST?port=N``, ``vnc://HOST:PORT`` | — | — |
| ``vmware-view`` | ``--serverURL X`` / ``-s X`` | ``--userName X`` / ``-u X`` (``--domainName``) | ``--desktopName X`` / ``-n X`` |
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

MAX_FIELD = 255
# Clients whose arguments are read (the agent reads the command line of these processes only).
KNOWN_CLIENTS = frozenset({"xfreerdp", "xfreerdp3", "wlfreerdp", "remote-viewer", "vmware-view"})
_SAFE = re.compile(r"^[A-Za-z0-9._:\[\]@\\-]+$")


@dataclass(frozen=True, slots=True)
class VdiTarget:
    address: str | None = None
    user: str | None = None
    desktop_name: str | None = None


def parse_client_args(client: str, argv: Sequence[str]) -> VdiTarget:
    """The target of ``client`` started with ``argv`` (``argv[0]`` is the program). Unknown client or
    nothing recognisable: an empty target."""
    args = [a for a in argv[1:256] if isinstance(a, str)]
    if client in ("xfreerdp", "xfreerdp3", "wlfreerdp"):
        return _freerdp(args)
    if client == "remote-viewer":
        return _remote_viewer(args)
    if client == "vmware-view":
        return _vmware_view(args)
    return VdiTarget()


def _clean(value: str | None, *, pattern: re.Pattern[str] = _SAFE) -> str | None:
    if not value or len(value) > MAX_FIELD or not pattern.match(value):
        return None
    return value


def _freerdp(args: list[str]) -> VdiTarget:
    host = port = user = domain = None
    for arg in args:
        if not arg.startswith(("/", "-", "+")):
            continue
        key, sep, value = arg[1:].partition(":")
        key = key.lower()
        if not sep:
            continue
        if key == "v":
            host = value
        elif key == "port":
            port = value
        elif key == "u":
            user = value
        elif key == "d":
            domain = value
        # /p:, /password:, /pth:, /gp:, /gt: ... are credentials: never read.
    address = host
    if host and port and port.isdigit() and ":" not in host:
        address = f"{host}:{port}"
    if user and domain and "\\" not in user and "@" not in user:
        user = f"{domain}\\{user}"
    return VdiTarget(_clean(address), _clean(user))


def _remote_viewer(args: list[str]) -> VdiTarget:
    for arg in args:
        if not arg.startswith(("spice://", "spice+tls://", "vnc://")):
            continue
        try:
            url = urlsplit(arg)
            host = url.hostname
            port = url.port or next(iter(parse_qs(url.query).get("port", [])), None)
            if port is None:
                port = next(iter(parse_qs(url.query).get("tls-port", [])), None)
        except ValueError:
            return VdiTarget()
        if host is None:
            return VdiTarget()
        host = f"[{host}]" if ":" in host else host
        address = f"{host}:{port}" if port and str(port).isdigit() else host
        return VdiTarget(_clean(address))  # a user or password in the URL is never taken
    return VdiTarget()


_VMWARE_VALUE = {
    "--serverurl": "server",
    "-s": "server",
    "--username": "user",
    "-u": "user",
    "--domainname": "domain",
    "-d": "domain",
    "--desktopname": "desktop",
    "-n": "desktop",
}
_VMWARE_SECRET = {"--password", "-p"}


def _vmware_view(args: list[str]) -> VdiTarget:
    found: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        key, sep, inline = arg.partition("=")
        key = key.lower()
        if key in _VMWARE_SECRET:
            i += 1 if sep else 2  # skip the password, whichever form
            continue
        if key in _VMWARE_VALUE:
            if sep:
                found[_VMWARE_VALUE[key]] = inline
                i += 1
            elif i + 1 < len(args):
                found[_VMWARE_VALUE[key]] = args[i + 1]
                i += 2
            else:
                i += 1
            continue
        i += 1
    server = found.get("server")
    if server and "://" in server:
        try:
            url = urlsplit(server)
            server = (url.hostname or "") + (f":{url.port}" if url.port else "")
        except ValueError:
            server = None
    user = found.get("user")
    domain = found.get("domain")
    if user and domain and "\\" not in user and "@" not in user:
        user = f"{domain}\\{user}"
    name = found.get("desktop")
    name = name if name and len(name) <= MAX_FIELD and name.isprintable() else None
    return VdiTarget(_clean(server), _clean(user), name)
