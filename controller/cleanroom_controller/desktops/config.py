"""The desktops file (``run --desktops FILE``, settings key ``desktops``): pools of non-persistent desktops,
each pool with its driver. TOML, validated; an error names the file, the line and the field.

```toml
[[pool]]
id = "billing"
driver = "libvirt"            # libvirt | command | container
uri = "qemu:///system"
wipe = "overlay"              # overlay: a fresh qcow2 overlay on the golden image; snapshot: revert
retries = 3
timeout_s = 120
[[pool.desktop]]
id = "bill-01"
address = "10.20.0.11"        # what the VDI client connects to
domain = "bill-01"
overlay = "/var/lib/cleanroom/desktops/bill-01.qcow2"
golden = "/var/lib/cleanroom/golden/billing.qcow2"

[[pool]]
id = "coding"
driver = "container"
uri = "unix:///run/docker.sock"  # the default for a container pool (a Docker or podman API socket)
image = "registry.example.org/desktops/coding:2026.11"   # on the daemon already: never pulled
stop_grace_s = 10             # log off: SIGTERM, then SIGKILL after this long
network = "desktops"          # default: the daemon's default network
env = ["VNC_PW"]              # the controller's environment variables passed into every container
[[pool.desktop]]
id = "code-01"
address = "10.20.1.11:6901"
container = "code-01"         # default: the desktop id
volumes = ["code-01-home:/home"]  # named volumes, removed and made anew on every wipe
command = ["/usr/bin/desktop", "--kiosk"]  # default: the image's own
ports = ["6901:6901"]         # published: [HOST_IP:]HOST_PORT:CONTAINER_PORT[/tcp|udp|sctp]
```
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cleanroom_protocol import tomlfiles

MAX_DESKTOPS_BYTES = 1024 * 1024
Ident = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
Address = Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9._:\[\]-]+$")]
Argv = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=4096)]], Field(min_length=1, max_length=64)
]
EnvName = Annotated[str, Field(pattern=r"^[A-Z_][A-Z0-9_]{0,127}$")]
# Container and volume names as the Docker Engine API accepts them.
EngineName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
# An image reference (name[:tag][@digest]) or an image id.
ImageRef = Annotated[str, Field(min_length=1, max_length=512, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]*$")]
# A named volume and where it is mounted: "NAME:/path". Never a bind mount (a host directory is not wiped).
_PORT = re.compile(
    r"^(?:(\d{1,3}(?:\.\d{1,3}){3}|\[[0-9A-Fa-f:]+\]):)?(\d{1,5}):(\d{1,5})(?:/(tcp|udp|sctp))?$"
)
_VOLUME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]{0,127}):(/[^:\x00]{0,1023})$")
DEFAULT_CONTAINER_URI = "unix:///run/docker.sock"
DEFAULT_LIBVIRT_URI = "qemu:///system"
# Placeholders a command template may use (anything else in braces is an error at load time).
PLACEHOLDERS = frozenset({"desktop", "pool", "address", "name", "domain", "user", "session", "agent"})
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


class DesktopsError(ValueError):
    """A desktops file that must not replace the one in force (the message names file, line and field)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CommandConfig(_Strict):
    """The ``command`` driver: a site's own scripts (Citrix, Horizon, Azure Virtual Desktop). Each argv is a
    template (``{desktop}``, ``{user}``…: one argument each, never a shell). Exit 0 is success, 75
    (EX_TEMPFAIL) "not yet" (retried), anything else a failure. Secrets reach the scripts only through the
    environment variables named in ``env``: they are never in this file, the logs or the audit trail."""

    log_off: Argv
    # Polled every poll_s after log_off until it exits 0 (the session is gone; Citrix's Stop-BrokerSession
    # and Horizon's log-off return before the log-off completes). None: log_off's own exit is the answer.
    session_gone: Argv | None = None
    wipe: Argv
    # Polled after wipe until it exits 0 (the desktop is fresh and ready). None: wipe's exit is the answer.
    ready: Argv | None = None
    state: Argv | None = None  # prints the desktop's state (first line, shown by `desktops list`)
    env: Annotated[list[EnvName], Field(max_length=32)] = []
    poll_s: Annotated[float, Field(gt=0, le=60)] = 1.0

    @model_validator(mode="after")
    def _known_placeholders(self) -> Self:
        for argv in (self.log_off, self.session_gone, self.wipe, self.ready, self.state):
            for arg in argv or ():
                for name in _PLACEHOLDER.findall(arg):
                    if name not in PLACEHOLDERS:
                        raise ValueError(
                            f"unknown placeholder {{{name}}} (known: {', '.join(sorted(PLACEHOLDERS))})"
                        )
        return self


class DesktopConfig(_Strict):
    id: Ident
    address: Address  # what the VDI client connects to (host, or host:port)
    name: Annotated[str, Field(min_length=1, max_length=255)] | None = None  # Horizon's --desktopName
    domain: Annotated[str, Field(min_length=1, max_length=255)] | None = None  # libvirt domain name
    overlay: Path | None = None
    golden: Path | None = None
    container: EngineName | None = None  # container pools: the container's name (default: the id)
    volumes: Annotated[list[str], Field(max_length=32)] = []  # container pools: "NAME:/path", wiped
    command: Argv | None = None  # container pools: the container's command (default: the image's)
    ports: Annotated[list[str], Field(max_length=32)] = []  # container pools: "[IP:]HOST:CONTAINER[/tcp]"

    @field_validator("ports")
    @classmethod
    def _ports(cls, ports: list[str]) -> list[str]:
        inside: set[str] = set()
        for p in ports:
            m = _PORT.match(p)
            if m is None or not all(0 < int(m.group(n)) < 65536 for n in (2, 3)):
                raise ValueError(f"{p!r} is not [HOST_IP:]HOST_PORT:CONTAINER_PORT[/tcp|udp|sctp]")
            key = f"{m.group(3)}/{m.group(4) or 'tcp'}"
            if key in inside:
                raise ValueError(f"container port {key} is published twice")
            inside.add(key)
        return ports

    @property
    def port_bindings(self) -> dict[str, tuple[str, int] | int]:
        """``ports`` as the Docker SDK takes them: ``{"6901/tcp": ("127.0.0.1", 16901)}``."""
        bindings: dict[str, tuple[str, int] | int] = {}
        for p in self.ports:
            m = _PORT.match(p)
            assert m is not None  # validated
            host_ip, host_port, inner, proto = m.groups()
            key = f"{inner}/{proto or 'tcp'}"
            bindings[key] = (host_ip.strip("[]"), int(host_port)) if host_ip else int(host_port)
        return bindings

    @field_validator("volumes")
    @classmethod
    def _named_volumes(cls, volumes: list[str]) -> list[str]:
        names: set[str] = set()
        for v in volumes:
            if v.startswith("/"):
                raise ValueError(f"{v!r} is a bind mount: a host directory is never wiped, name a volume")
            m = _VOLUME.match(v)
            if m is None:
                raise ValueError(f"{v!r} is not NAME:/path (a named volume and where it is mounted)")
            if m.group(1) in names:
                raise ValueError(f"volume {m.group(1)!r} appears twice")
            names.add(m.group(1))
        return volumes

    @property
    def container_name(self) -> str:
        return self.container or self.id

    @property
    def volume_mounts(self) -> list[tuple[str, str]]:
        """``(volume name, mount path)`` of each named volume."""
        return [(v.split(":", 1)[0], v.split(":", 1)[1]) for v in self.volumes]


class PoolConfig(_Strict):
    id: Ident
    driver: Literal["libvirt", "command", "container"]
    # Default: DEFAULT_LIBVIRT_URI, or DEFAULT_CONTAINER_URI for a container pool (_default_uri).
    uri: Annotated[str, Field(min_length=1, max_length=1024)] = DEFAULT_LIBVIRT_URI
    wipe: Literal["overlay", "snapshot"] = "overlay"
    snapshot: Annotated[str, Field(min_length=1, max_length=255)] | None = None
    retries: Annotated[int, Field(ge=1, le=20)] = 3
    timeout_s: Annotated[float, Field(gt=0, le=3600)] = 120.0
    backoff_s: Annotated[float, Field(ge=0, le=600)] = 2.0
    command: CommandConfig | None = None
    image: ImageRef | None = None  # container pools: the image every wipe starts a desktop from
    stop_grace_s: Annotated[float, Field(ge=0, le=300)] = 10.0  # container pools: SIGTERM → SIGKILL
    network: EngineName | None = None  # container pools: the network a desktop joins (default: the daemon's)
    # Container pools: names of the controller's environment variables passed into each container (secrets
    # such as a VNC password stay out of this file; their values are never logged or audited).
    env: Annotated[list[EnvName], Field(max_length=32)] = []
    desktop: Annotated[list[DesktopConfig], Field(max_length=10_000)] = []

    @model_validator(mode="before")
    @classmethod
    def _default_uri(cls, data: Any) -> Any:
        """A container pool without ``uri`` talks to the local Docker socket, not to qemu:///system."""
        if isinstance(data, dict) and data.get("driver") == "container" and "uri" not in data:
            return {**data, "uri": DEFAULT_CONTAINER_URI}
        return data

    @model_validator(mode="after")
    def _driver_needs(self) -> Self:
        if self.driver == "container" and self.image is None:
            raise ValueError("driver 'container' needs image = REFERENCE (an image on the daemon)")
        if self.driver == "container" and self.stop_grace_s >= self.timeout_s:
            raise ValueError("stop_grace_s must be shorter than timeout_s (a log-off would never finish)")
        if self.driver == "command" and self.command is None:
            raise ValueError("driver 'command' needs a [pool.command] table (log_off, wipe)")
        if self.driver == "libvirt":
            if self.wipe == "snapshot" and self.snapshot is None:
                raise ValueError("wipe = 'snapshot' needs snapshot = NAME")
            for d in self.desktop:
                if d.domain is None:
                    raise ValueError(f"desktop {d.id}: driver 'libvirt' needs domain")
                if self.wipe == "overlay" and (d.overlay is None or d.golden is None):
                    raise ValueError(f"desktop {d.id}: wipe 'overlay' needs overlay and golden")
                if (
                    d.overlay is not None
                    and d.golden is not None
                    and d.overlay.resolve() == d.golden.resolve()
                ):
                    raise ValueError(f"desktop {d.id}: overlay and golden are the same file")
        return self


class DesktopsFile(_Strict):
    pool: Annotated[list[PoolConfig], Field(max_length=1000)] = []

    @model_validator(mode="after")
    def _unique(self) -> Self:
        seen_pools: set[str] = set()
        seen_desktops: set[str] = set()
        seen_addresses: dict[str, str] = {}
        # A container or volume two desktops share on one daemon: each one's wipe would empty the other.
        seen_engine: dict[tuple[str, str, str], str] = {}
        for p in self.pool:
            if p.id in seen_pools:
                raise ValueError(f"pool id {p.id!r} appears twice")
            seen_pools.add(p.id)
            for d in p.desktop:
                if d.id in seen_desktops:
                    raise ValueError(f"desktop id {d.id!r} appears twice")
                seen_desktops.add(d.id)
                key = d.address.lower()
                if key in seen_addresses:
                    raise ValueError(f"desktops {seen_addresses[key]} and {d.id} share address {d.address}")
                seen_addresses[key] = d.id
                if p.driver != "container":
                    continue
                for kind, name in [("container", d.container_name)] + [
                    ("volume", volume) for volume, _path in d.volume_mounts
                ]:
                    if (p.uri, kind, name) in seen_engine:
                        raise ValueError(
                            f"desktops {seen_engine[p.uri, kind, name]} and {d.id} share {kind} {name}"
                        )
                    seen_engine[p.uri, kind, name] = d.id
        return self


@dataclass(frozen=True, slots=True)
class DesktopSpec:
    """One desktop with its pool: what a driver is given."""

    pool: PoolConfig
    desktop: DesktopConfig

    @property
    def id(self) -> str:
        return self.desktop.id


class Desktops:
    """The desktops in force, looked up by id and by what a VDI client connects to."""

    def __init__(self, parsed: DesktopsFile, source: str = "") -> None:
        self.file = parsed
        self.source = source
        self._by_id = {d.id: DesktopSpec(p, d) for p in parsed.pool for d in p.desktop}
        self._by_address: dict[str, DesktopSpec] = {}
        self._by_name: dict[str, DesktopSpec] = {}
        for spec in self._by_id.values():
            self._by_address[spec.desktop.address.lower()] = spec
            if spec.desktop.name is not None:
                self._by_name[spec.desktop.name.lower()] = spec

    @classmethod
    def empty(cls) -> Desktops:
        return cls(DesktopsFile())

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, desktop_id: str) -> DesktopSpec | None:
        return self._by_id.get(desktop_id)

    def match(self, address: str | None, name: str | None = None) -> DesktopSpec | None:
        """The desktop a client connects to: its address as configured (``host`` matches ``host:port`` and
        the reverse), else the desktop name (Horizon)."""
        if address:
            key = address.lower()
            spec = self._by_address.get(key) or self._by_address.get(_host_of(key))
            if spec is None:
                spec = next((s for a, s in self._by_address.items() if _host_of(a) == key), None)
            if spec is not None:
                return spec
        if name:
            return self._by_name.get(name.lower())
        return None


def _host_of(address: str) -> str:
    """``host`` of ``host:port`` / ``[v6]:port``; the address itself otherwise."""
    if address.startswith("["):
        return address[1 : address.find("]")] if "]" in address else address
    if address.count(":") == 1:
        return address.split(":", 1)[0]
    return address


def load_desktops(path: Path) -> Desktops:
    """Read and validate the desktops file; raise :class:`DesktopsError` naming file, line and field."""
    text = tomlfiles.read_text(path, max_bytes=MAX_DESKTOPS_BYTES, what="desktops file", error=DesktopsError)
    return parse_desktops(text, source=str(path))


def parse_desktops(text: str, *, source: str = "<desktops>") -> Desktops:
    data = tomlfiles.parse(text, source=source, error=DesktopsError)
    try:
        return Desktops(DesktopsFile.model_validate(data), source)
    except ValidationError as exc:
        raise DesktopsError(tomlfiles.describe(exc, text, source)) from exc
