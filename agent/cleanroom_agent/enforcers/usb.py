"""USB device authorization (policy ``[usb]``), USBGuard-style, through sysfs and kernel uevents.

Enforce mode: at start every root hub gets ``authorized_default=0`` (new devices arrive deauthorized),
devices already present are judged (HID-only devices present at start stay authorized when
``keep_present_hid`` is set — the keyboard in use is never locked out), and every new device announced by
a kernel uevent is judged and gets ``authorized`` written (1 allow, 0 block; reject also removes it).
Audit mode touches nothing and reports what would have been blocked (``usb.detected``).
On stop ``authorized_default`` stays 0: a stopped agent must not open the ports (fail closed).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from pathlib import Path

from cleanroom_protocol import EnforcerState, Event, Mode, Policy, Severity
from cleanroom_protocol.usbrulelex import escape
from cleanroom_protocol.usbrules import (
    Target,
    UsbDevice,
    UsbRule,
    UsbRuleError,
    UsbVerdict,
    is_hid_only,
    judge_device,
    parse_rules,
)

from .base import Enforcer, EventSink
from .sysfs import SysfsError, UsbSysfs
from .uevent import UeventError, open_uevent_socket, parse_uevent

SocketFactory = Callable[[], socket.socket]
_DRAIN_PER_WAKEUP = 256


class UsbEnforcer(Enforcer):
    name = "usb"

    def __init__(
        self,
        emit: EventSink,
        *,
        sysfs_root: Path = Path("/sys"),
        uevent_socket: SocketFactory = open_uevent_socket,
    ) -> None:
        super().__init__(emit)
        self._sysfs = UsbSysfs(sysfs_root)
        self._socket_factory = uevent_socket
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rules: list[UsbRule] = []
        self._rule_error: str | None = None
        self._mode = Mode.ENFORCE
        self._keep_present_hid = True
        self._kept_at_start: set[str] = set()
        self._last: dict[str, Target] = {}
        self.rejected_uevents = 0

    # lifecycle -------------------------------------------------------------------------------------
    async def _start(self, policy: Policy, mode: Mode) -> None:
        self._loop = asyncio.get_running_loop()
        self._configure(policy, mode)
        if not self._sysfs.available():
            self._set_status(EnforcerState.UNSUPPORTED, f"no USB bus ({self._sysfs.devices_dir} missing)")
            return
        problems = self._lock_hubs()
        for name in self._sysfs.devices():
            if self._keep_present_hid and self._is_present_hid(name):
                self._kept_at_start.add(name)
        self._judge_present()
        try:
            self._sock = self._socket_factory()
            self._sock.setblocking(False)
            self._loop.add_reader(self._sock.fileno(), self._on_readable)
        except OSError as exc:
            problems.append(f"no uevent socket ({exc.strerror or exc}): new devices are not judged")
        self._update_status(problems)

    async def _apply(self, policy: Policy, mode: Mode) -> None:
        self._configure(policy, mode)
        if self._status.state is EnforcerState.UNSUPPORTED:
            return
        problems = self._lock_hubs()
        self._judge_present()
        if self._sock is None:
            problems.append("no uevent socket: new devices are not judged")
        self._update_status(problems)

    async def _stop(self) -> None:
        if self._sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        self._set_status(EnforcerState.OFF)

    # decisions -------------------------------------------------------------------------------------
    def _configure(self, policy: Policy, mode: Mode) -> None:
        self._mode = mode
        self._keep_present_hid = policy.usb.keep_present_hid
        try:
            self._rules = parse_rules(policy.usb.rules)
            self._rule_error = None
        except UsbRuleError as exc:
            # Fail closed: no rules means every device gets the implicit block.
            self._rules = []
            self._rule_error = f"policy rule refused, blocking all new devices: {exc}"

    def _update_status(self, problems: list[str]) -> None:
        if self._rule_error:
            problems = [self._rule_error, *problems]
        if problems:
            self._set_status(EnforcerState.DEGRADED, "; ".join(problems))
        else:
            self._set_status(EnforcerState.ACTIVE)

    def _lock_hubs(self) -> list[str]:
        if self._mode is not Mode.ENFORCE:
            return []
        problems = []
        for hub in self._sysfs.root_hubs():
            try:
                self._sysfs.set_authorized_default(hub, 0)
            except SysfsError as exc:
                problems.append(str(exc))
        return problems

    def _is_present_hid(self, name: str) -> bool:
        try:
            return is_hid_only(self._sysfs.read_device(name))
        except SysfsError:
            return False

    def _judge_present(self) -> None:
        for name in self._sysfs.devices():
            if name in self._kept_at_start:
                self._report(name, None, UsbVerdict(Target.ALLOW, "keep_present_hid", "HID present at start"))
                continue
            self._judge(name, source="present")

    def _judge(self, name: str, *, source: str) -> None:
        try:
            device = self._sysfs.read_device(name)
        except SysfsError as exc:
            # Unreadable device: nothing to match on, so the implicit block applies.
            self._act(name, None, UsbVerdict(Target.BLOCK, "implicit block", f"unreadable: {exc}"), source)
            return
        self._act(name, device, judge_device(self._rules, device), source)

    def _act(self, name: str, device: UsbDevice | None, verdict: UsbVerdict, source: str) -> None:
        error = None
        if self._mode is Mode.ENFORCE:
            try:
                if verdict.target is Target.ALLOW:
                    if self._sysfs.authorized(name) != "1":
                        self._sysfs.set_authorized(name, 1)
                else:
                    self._sysfs.set_authorized(name, 0)
                    if verdict.target is Target.REJECT:
                        self._sysfs.remove(name)
            except SysfsError as exc:
                error = str(exc)
        self._report(name, device, verdict, source=source, error=error)

    def _report(
        self,
        name: str,
        device: UsbDevice | None,
        verdict: UsbVerdict,
        *,
        source: str = "present",
        error: str | None = None,
    ) -> None:
        if self._last.get(name) is verdict.target and source == "present" and error is None:
            return  # re-judging present devices after a policy update: report changes only
        self._last[name] = verdict.target
        allowed = verdict.target is Target.ALLOW
        enforced = self._mode is Mode.ENFORCE and error is None
        kind = "usb.allowed" if allowed else ("usb.blocked" if enforced else "usb.detected")
        details: dict[str, str | int | float | bool | None] = {
            "device": name,
            "verdict": verdict.target.value,
            "rule": verdict.rule[:256],
            "reason": verdict.reason[:512],
            "source": source,
            "mode": self._mode.value,
        }
        if device is not None:
            # Strings as USBGuard writes them (\xHH for non-printable bytes): a rule can be copied from them.
            details.update(
                id=device.id,
                name=escape(device.name)[:256],
                serial=escape(device.serial)[:256],
                interfaces=" ".join(str(i) for i in device.interfaces)[:512],
                hash=device.hash.decode("ascii", "replace"),
                port=device.port.decode("ascii", "replace"),
            )
        if error:
            details["error"] = error[:512]
        self._emit(
            Event(
                kind=kind,
                at=time.time(),
                severity=Severity.INFO if allowed else Severity.WARNING,
                blocked=not allowed and enforced,
                details=details,
            )
        )

    # uevents ---------------------------------------------------------------------------------------
    def _on_readable(self) -> None:
        assert self._sock is not None
        for _ in range(_DRAIN_PER_WAKEUP):
            try:
                raw = self._sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # ENOBUFS: the kernel dropped uevents; judge everything present again so none escapes.
                self._judge_unjudged()
                continue
            self.handle_uevent(raw)

    def handle_uevent(self, raw: bytes) -> None:
        """One kernel uevent datagram (real format, see uevent.py)."""
        try:
            event = parse_uevent(raw)
        except UeventError:
            self.rejected_uevents += 1
            return
        if event.subsystem != "usb" or event.devtype != "usb_device":
            return
        if event.action == "add":
            self._last.pop(event.name, None)
            self._judge(event.name, source="uevent")
        elif event.action == "remove":
            self._last.pop(event.name, None)

    def _judge_unjudged(self) -> None:
        for name in self._sysfs.devices():
            if name not in self._last and name not in self._kept_at_start:
                self._judge(name, source="rescan")
