"""Posture: facts about this endpoint assembled from small probes; a fingerprint decides "changed".

The parsing and assembling functions are pure; :class:`LinuxHostProbe` is the one place that reads the
host (files under /etc, /proc, /sys, the environment, psutil).
"""

from __future__ import annotations

import glob
import hashlib
import os
import platform
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil

from cleanroom_protocol import (
    EnforcerStatus,
    Mode,
    MountInfo,
    PolicyRef,
    Posture,
    ProcessInfo,
    SessionInfo,
    canonical_json,
)

from .. import __version__
from ..sessions.clients import ProcessSnapshot

# Pseudo and virtual filesystems carry no data a user could take away: not reported as mounts.
_PSEUDO_FS = {
    "proc", "sysfs", "devtmpfs", "devpts", "tmpfs", "cgroup", "cgroup2", "securityfs", "pstore", "bpf",
    "debugfs", "tracefs", "configfs", "fusectl", "mqueue", "hugetlbfs", "autofs", "binfmt_misc", "nsfs",
    "overlay", "squashfs", "ramfs", "efivarfs", "rpc_pipefs", "nfsd", "selinuxfs",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class HostFacts:
    hostname: str
    os: str
    kernel: str
    display_server: str
    boot_time: float
    users: list[str]
    mounts: list[MountInfo]


class HostProbe(Protocol):
    def host_facts(self) -> HostFacts: ...


# --- pure parsing ----------------------------------------------------------------------------------


def parse_os_release(text: str) -> str:
    """``PRETTY_NAME`` (or ``NAME VERSION_ID``) from /etc/os-release content; ``"unknown"`` if absent."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key and not key.startswith("#"):
            values[key] = value.strip().strip("\"'")
    if values.get("PRETTY_NAME"):
        return values["PRETTY_NAME"][:256]
    name = " ".join(v for v in (values.get("NAME"), values.get("VERSION_ID")) if v)
    return name[:256] or "unknown"


def detect_display_server(env: Mapping[str, str], x11_sockets: Sequence[str]) -> str:
    """``wayland`` if WAYLAND_DISPLAY is set, ``x11`` if DISPLAY is set or an X socket exists, else ``none``."""
    if env.get("WAYLAND_DISPLAY"):
        return "wayland"
    if env.get("DISPLAY") or x11_sockets:
        return "x11"
    return "none"


def block_device_base(device: str) -> str | None:
    """/dev/sdb1 → sdb, /dev/nvme0n1p2 → nvme0n1, /dev/mmcblk0p1 → mmcblk0; not a /dev path → None."""
    if not device.startswith("/dev/"):
        return None
    name = os.path.basename(device)
    if name.startswith(("nvme", "mmcblk", "loop")) and "p" in name[4:]:
        head, _, tail = name.rpartition("p")
        return head if tail.isdigit() and head else name
    if name.startswith(("sd", "vd", "hd", "xvd")):
        return name.rstrip("0123456789") or name
    return name  # sr0, md0, dm-0: the number is part of the device name


def build_mounts(
    partitions: Iterable[tuple[str, str, str, str]], removable_devices: set[str]
) -> list[MountInfo]:
    """``(device, mountpoint, fstype, opts)`` rows → real-filesystem mounts, removable and writable flagged."""
    mounts = []
    for device, mountpoint, fstype, opts in partitions:
        if fstype in _PSEUDO_FS:
            continue
        base = block_device_base(device)
        mounts.append(
            MountInfo(
                device=device[:256],
                mountpoint=mountpoint[:4096],
                fstype=fstype[:256],
                removable=base is not None and base in removable_devices,
                writable="rw" in opts.split(","),
            )
        )
    return sorted(mounts, key=lambda m: m.mountpoint)[:256]


def find_denied(procs: Sequence[ProcessSnapshot], deny: Sequence[str]) -> list[ProcessInfo]:
    """Running processes whose comm or executable basename the policy denies (case-insensitive)."""
    denied = {d.lower(): d for d in deny}
    out = []
    for p in procs:
        names = {n.lower() for n in p.names()}
        match = next((denied[n] for n in sorted(names) if n in denied), None)
        if match is None:
            # comm is truncated to 15 characters
            match = next(
                (d for low, d in sorted(denied.items()) if len(low) > 15 and low[:15] == p.name.lower()), None
            )
        if match is not None:
            out.append(ProcessInfo(name=match, pid=p.pid, user=p.user))
    return sorted(out, key=lambda i: (i.name, i.pid))[:1024]


def assemble_posture(
    *,
    agent_id: str,
    mode: Mode,
    policy: PolicyRef | None,
    facts: HostFacts,
    denied: list[ProcessInfo],
    sessions: list[SessionInfo],
    enforcers: list[EnforcerStatus],
    offline_since: float | None,
    spool_full: bool = False,
    spool_refused: int = 0,
) -> Posture:
    return Posture(
        agent_id=agent_id,
        agent_version=__version__,
        mode=mode,
        policy=policy,
        hostname=facts.hostname,
        os=facts.os,
        kernel=facts.kernel,
        display_server=facts.display_server,
        boot_time=facts.boot_time,
        users=facts.users,
        mounts=facts.mounts,
        denied_processes=denied,
        sessions=sessions[:256],
        enforcers=enforcers[:64],
        offline_since=offline_since,
        spool_full=spool_full,
        spool_refused=spool_refused,
    )


def fingerprint(posture: Posture) -> str:
    """Hash of the posture without its volatile parts (offline_since, the pids inside a session's tree),
    so a changed fingerprint means something a judge could care about changed."""
    data = posture.model_dump(mode="json")
    data.pop("offline_since", None)
    for session in data["sessions"]:
        session.pop("pids", None)
    return hashlib.sha256(canonical_json(data)).hexdigest()


# --- the real probe --------------------------------------------------------------------------------


class LinuxHostProbe:
    def __init__(
        self,
        *,
        os_release: Path = Path("/etc/os-release"),
        sys_block: Path = Path("/sys/block"),
        x11_socket_glob: str = "/tmp/.X11-unix/X*",  # noqa: S108 - the X server's well-known socket dir
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._os_release = os_release
        self._sys_block = sys_block
        self._x11_glob = x11_socket_glob
        self._env = env if env is not None else os.environ

    def host_facts(self) -> HostFacts:
        return HostFacts(
            hostname=socket.gethostname()[:256],
            os=self._os_name(),
            kernel=platform.release()[:256],
            display_server=detect_display_server(self._env, glob.glob(self._x11_glob)),
            boot_time=psutil.boot_time(),
            users=sorted({u.name for u in psutil.users() if u.name})[:256],
            mounts=build_mounts(
                ((p.device, p.mountpoint, p.fstype, p.opts) for p in psutil.disk_partitions(all=True)),
                self.removable_devices(),
            ),
        )

    def _os_name(self) -> str:
        try:
            return parse_os_release(self._os_release.read_text(encoding="utf-8", errors="replace")[:65536])
        except OSError:
            return "unknown"

    def removable_devices(self) -> set[str]:
        """Block devices whose /sys/block/<dev>/removable is 1, plus those on a USB bus."""
        out: set[str] = set()
        try:
            entries = list(self._sys_block.iterdir())
        except OSError:
            return out
        for entry in entries:
            try:
                removable = (entry / "removable").read_text().strip() == "1"
                on_usb = "/usb" in os.path.realpath(entry / "device")
            except OSError:
                continue
            if removable or on_usb:
                out.add(entry.name)
        return out
