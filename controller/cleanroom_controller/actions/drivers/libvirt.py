"""The libvirt desktop driver (libvirt-python): a desktop is a domain on a qcow2 overlay over a golden image.

- log off: the domain is destroyed (powered off; a non-persistent desktop keeps nothing a log-off would
  save) and confirmed inactive.
- wipe, ``overlay``: destroy; a new overlay is made *beside* the old one (``qemu-img create -f qcow2 -b GOLDEN
  -F qcow2``), synced, then renamed over it (a crash leaves either the old overlay, wiped again on resume,
  or the new one, never half of one); verified fresh (its backing file is the golden image, it holds no data
  of its own); the domain started and confirmed running. The golden image is only ever read (by qemu-img,
  to learn its size).
- wipe, ``snapshot``: destroy, revert to the pool's named snapshot, start, confirm running and that the
  current snapshot is that one.

libvirt calls block: each runs in a worker thread, bounded by the pool's ``timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import threading
from pathlib import Path
from typing import Any

import libvirt  # type: ignore[import-untyped]  # libvirt-python ships no type information

from ...desktops.config import DesktopSpec
from .base import DesktopDriver, DesktopReport, Outcome, SessionRef

QEMU_IMG = "qemu-img"
_STATE_NAMES = {
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutting_down",
    libvirt.VIR_DOMAIN_SHUTOFF: "shut_off",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
}


class WipeFailed(Exception):
    """A wipe step that did not do what it must (the message says which)."""


class LibvirtDriver(DesktopDriver):
    name = "libvirt"

    def __init__(self, qemu_img: str = QEMU_IMG) -> None:
        self._qemu_img = qemu_img
        self._connections: dict[str, libvirt.virConnect] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            for conn in self._connections.values():
                with contextlib.suppress(libvirt.libvirtError):
                    conn.close()
            self._connections.clear()

    # -- interface ---------------------------------------------------------------------------------------
    async def log_off(self, desktop: DesktopSpec | None, session: SessionRef) -> Outcome:
        if desktop is None:
            return Outcome("", "unsupported", "the libvirt driver logs off desktops, not endpoints")
        return await self._bounded(desktop, self._log_off, "log_off")

    async def wipe(self, desktop: DesktopSpec) -> Outcome:
        return await self._bounded(desktop, self._wipe, "wipe")

    async def report(self, desktop: DesktopSpec) -> DesktopReport:
        try:
            return await asyncio.wait_for(asyncio.to_thread(self._report, desktop), desktop.pool.timeout_s)
        except (TimeoutError, libvirt.libvirtError, OSError) as exc:
            return DesktopReport("unknown", _short(exc))

    # -- steps (worker thread) -----------------------------------------------------------------------------
    async def _bounded(self, desktop: DesktopSpec, step: Any, what: str) -> Outcome:
        try:
            detail = await asyncio.wait_for(asyncio.to_thread(step, desktop), desktop.pool.timeout_s)
        except TimeoutError:
            return Outcome("", "failed", f"{what} took longer than {desktop.pool.timeout_s:g} s")
        except (libvirt.libvirtError, WipeFailed, OSError) as exc:
            return Outcome("", "failed", f"{what}: {_short(exc)}")
        return Outcome("", "clean" if what == "wipe" else "ended", detail)

    def _log_off(self, desktop: DesktopSpec) -> str:
        dom = self._domain(desktop)
        if dom is None:
            return "no such domain: nothing runs"
        if dom.isActive():
            dom.destroy()
        if dom.isActive():
            raise WipeFailed(f"domain {dom.name()} still running after destroy")
        return f"domain {dom.name()} powered off"

    def _wipe(self, desktop: DesktopSpec) -> str:
        dom = self._domain(desktop)
        if dom is None:
            raise WipeFailed(f"no domain {desktop.desktop.domain!r} at {desktop.pool.uri}")
        if dom.isActive():
            dom.destroy()
        if desktop.pool.wipe == "snapshot":
            assert desktop.pool.snapshot is not None  # config validation
            snap = dom.snapshotLookupByName(desktop.pool.snapshot, 0)
            dom.revertToSnapshot(snap, 0)
            current = dom.snapshotCurrent(0).getName()
            if current != desktop.pool.snapshot:
                raise WipeFailed(f"current snapshot is {current!r}, not {desktop.pool.snapshot!r}")
            fresh = f"reverted to snapshot {current}"
        else:
            overlay, golden = desktop.desktop.overlay, desktop.desktop.golden
            assert overlay is not None and golden is not None  # config validation
            self.recreate_overlay(overlay, golden, desktop.pool.timeout_s)
            fresh = self.verify_fresh(overlay, golden, desktop.pool.timeout_s)
        if not dom.isActive():
            dom.create()
        if not dom.isActive():
            raise WipeFailed(f"domain {dom.name()} did not start")
        return f"{fresh}; domain {dom.name()} running"

    def _report(self, desktop: DesktopSpec) -> DesktopReport:
        dom = self._domain(desktop)
        if dom is None:
            return DesktopReport("missing", f"no domain {desktop.desktop.domain!r}")
        state, _reason = dom.state(0)
        return DesktopReport(_STATE_NAMES.get(state, "unknown"), f"domain {dom.name()}")

    # -- overlay files -------------------------------------------------------------------------------------
    def recreate_overlay(self, overlay: Path, golden: Path, timeout_s: float) -> None:
        """A fresh overlay on ``golden`` made beside ``overlay`` (same directory: the rename is atomic),
        synced, then renamed over it and the directory synced."""
        golden = golden.resolve()
        if not golden.is_file():
            raise WipeFailed(f"golden image {golden} is missing")
        fresh = overlay.with_name(f".{overlay.name}.new-{secrets.token_hex(4)}")
        try:
            _run(
                [self._qemu_img, "create", "-q", "-f", "qcow2", "-b", str(golden), "-F", "qcow2", str(fresh)],
                timeout_s,
            )
            try:
                old = overlay.stat()
            except FileNotFoundError:
                old = None
            if old is not None:  # the hypervisor's user must still be able to open it
                os.chmod(fresh, old.st_mode & 0o7777)
                os.chown(fresh, old.st_uid, old.st_gid)
            fd = os.open(fresh, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(fresh, overlay)
        finally:
            fresh.unlink(missing_ok=True)
        dir_fd = os.open(overlay.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def verify_fresh(self, overlay: Path, golden: Path, timeout_s: float) -> str:
        """The overlay is qcow2, backed by ``golden``, and holds no data of its own."""
        info = json.loads(_run([self._qemu_img, "info", "--output=json", "-U", str(overlay)], timeout_s))
        backing = info.get("full-backing-filename") or info.get("backing-filename")
        if info.get("format") != "qcow2" or backing is None or Path(backing).resolve() != golden.resolve():
            raise WipeFailed(
                f"overlay {overlay} is {info.get('format')} backed by {backing!r}, not by {golden}"
            )
        extents = json.loads(_run([self._qemu_img, "map", "--output=json", "-U", str(overlay)], timeout_s))
        own = [e for e in extents if e.get("depth") == 0 and e.get("data")]
        if own:
            raise WipeFailed(f"overlay {overlay} holds {sum(int(e['length']) for e in own)} bytes of its own")
        return f"overlay {overlay.name} fresh on {golden.name}"

    # -- libvirt -------------------------------------------------------------------------------------------
    def _domain(self, desktop: DesktopSpec) -> libvirt.virDomain | None:
        name = desktop.desktop.domain or desktop.desktop.id
        try:
            return self._connection(desktop.pool.uri).lookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            with self._lock:  # a broken connection: open a new one next time
                self._connections.pop(desktop.pool.uri, None)
            raise

    def _connection(self, uri: str) -> libvirt.virConnect:
        with self._lock:
            conn = self._connections.get(uri)
            if conn is None or not conn.isAlive():
                conn = libvirt.open(uri)
                self._connections[uri] = conn
            return conn


def _run(argv: list[str], timeout_s: float) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    except FileNotFoundError as exc:
        raise WipeFailed(f"{argv[0]} not found (Debian: qemu-utils)") from exc
    except subprocess.TimeoutExpired as exc:
        raise WipeFailed(f"{argv[0]} {argv[1]} took longer than {timeout_s:g} s") from exc
    if done.returncode != 0:
        raise WipeFailed(f"{argv[0]} {argv[1]} exited {done.returncode}: {done.stderr.strip()[:300]}")
    return done.stdout


def _short(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__)[:300]
