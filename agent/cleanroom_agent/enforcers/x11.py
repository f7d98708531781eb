"""X11 backends (python-xlib), each on its own display connection and thread:

* :class:`SelectionGuard` — XFixes selection-owner watch on CLIPBOARD and PRIMARY. On a forbidden change
  it takes ownership back and answers every SelectionRequest with nothing (property None), so a paste
  gets no data ("target STRING not available" from xclip). Measured here: ~1 ms copy → cleared.
* :class:`PrintKeyGrab` — XGrabKey of Print on the root window with AnyModifier; presses are reported.

The owner's process comes from the X-Resource extension (``XResQueryClientIds`` with the local client PID
mask: the server knows the peer pid of local connections), falling back to ``_NET_WM_PID``.
Clipboard content is never read: to judge "text with max_bytes" the guard asks for ``TARGETS`` (a list of
type names) and has the text converted into a property on its own window, then asks the server only for
that property's length (GetProperty with length 0 returns ``bytes_after`` = size) and deletes it.
"""

from __future__ import annotations

import dataclasses
import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from Xlib import X, Xatom, display, error
from Xlib.ext import res, xfixes
from Xlib.protocol import event as xevent

from .clipboardrules import Handling, TextCheck, judge_text

SELECTIONS = ("CLIPBOARD", "PRIMARY")
_PROBE_TIMEOUT_S = 1.0
_MAX_TARGETS = 64


class X11Unavailable(Exception):
    """No usable X display; the message is the reason for status."""


def display_problem(env: dict[str, str] | os._Environ[str], display_name: str | None) -> str | None:
    """Why X11 enforcement cannot work in this environment (None when it can be tried)."""
    if env.get("WAYLAND_DISPLAY") or env.get("XDG_SESSION_TYPE") == "wayland":
        return "Wayland session: the X11 guard cannot see Wayland clipboards or keys"
    if not (display_name or env.get("DISPLAY")):
        return "no X display (DISPLAY unset)"
    return None


def open_display(display_name: str | None) -> Any:
    try:
        return display.Display(display_name)
    except (error.DisplayError, error.ConnectionClosedError, OSError) as exc:
        raise X11Unavailable(
            f"cannot open X display {display_name or os.environ.get('DISPLAY')}: {exc}"
        ) from exc


class _XThread:
    """One display connection served by one thread; ``stop`` wakes it through a pipe."""

    thread_name = "x11"

    def __init__(self, display_name: str | None) -> None:
        self._display_name = display_name
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()
        self._stopping = False
        self.problem: str | None = None
        self.ready = threading.Event()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _main(self) -> None:
        attempt = 0
        while not self._stopping:
            try:
                disp = open_display(self._display_name)
                try:
                    self._setup(disp)
                    self.problem = None
                    attempt = 0
                    self.ready.set()
                    self._on_state(None)
                    self._serve(disp)
                finally:
                    disp.close()
            except (X11Unavailable, error.XError, error.ConnectionClosedError, OSError) as exc:
                if self._stopping:
                    return
                self.problem = str(exc) or type(exc).__name__
                self._on_state(self.problem)
                self.ready.set()
            # Reconnect with jittered backoff (X server restarted, display not up yet).
            attempt += 1
            delay = min(30.0, 0.2 * 1.5 ** min(10, attempt))
            r, _, _ = select.select([self._wake_r], [], [], delay)
            if r:
                return

    def _serve(self, disp: Any) -> None:
        fd = disp.fileno()
        while not self._stopping:
            # pending_events() reads what the socket has; a closed connection raises here.
            while disp.pending_events():
                self._handle(disp, disp.next_event())
            r, _, _ = select.select([fd, self._wake_r], [], [], 5.0)
            if self._wake_r in r:
                return

    def _setup(self, disp: Any) -> None:
        raise NotImplementedError

    def _handle(self, disp: Any, ev: Any) -> None:
        raise NotImplementedError

    def _on_state(self, problem: str | None) -> None:
        """Called in the thread when the connection comes up (None) or fails (reason)."""


@dataclass(frozen=True)
class OwnerChange:
    selection: str
    window: int
    pid: int | None


@dataclass(frozen=True)
class SelectionOutcome:
    selection: str
    pid: int | None
    handling: Handling
    blocked: bool  # the policy forbids this change
    enforced: bool  # and the guard took ownership back
    reason: str
    latency_s: float  # owner change seen → ownership taken (or judged)


DecideOwner = Callable[[OwnerChange], Handling]
QuickDecision = Callable[[str], Handling | None]
ReportOutcome = Callable[[SelectionOutcome], None]
ReportState = Callable[[str | None], None]


class SelectionGuard(_XThread):
    thread_name = "clipboard-x11"

    def __init__(
        self,
        display_name: str | None,
        decide: DecideOwner,
        report: ReportOutcome,
        state: ReportState,
        quick: QuickDecision = lambda selection: None,
    ) -> None:
        super().__init__(display_name)
        self._decide = decide
        self._quick = quick
        self._report = report
        self._state = state
        self._deferred: list[Any] = []

    def _on_state(self, problem: str | None) -> None:
        self._state(problem)

    def _setup(self, disp: Any) -> None:
        if not disp.has_extension("XFIXES"):
            raise X11Unavailable("X server has no XFIXES extension")
        disp.xfixes_query_version()
        self._has_res = disp.has_extension("X-Resource")
        root = disp.screen().root
        self._win = root.create_window(0, 0, 1, 1, 0, X.CopyFromParent, X.InputOnly, X.CopyFromParent)
        self._win.change_property(disp.intern_atom("WM_NAME"), Xatom.STRING, 8, b"cleanroom-clipboard-guard")
        self._atoms = {name: disp.intern_atom(name) for name in SELECTIONS}
        self._names = {atom: name for name, atom in self._atoms.items()}
        self._targets_atom = disp.intern_atom("TARGETS")
        self._incr_atom = disp.intern_atom("INCR")
        self._probe_prop = disp.intern_atom("CLEANROOM_PROBE")
        self._wm_pid = disp.intern_atom("_NET_WM_PID")
        for atom in self._atoms.values():
            disp.xfixes_select_selection_input(root, atom, xfixes.XFixesSetSelectionOwnerNotifyMask)
        disp.sync()
        # Judge whoever owns the selections right now, as if they had just copied.
        for name, atom in self._atoms.items():
            owner = disp.get_selection_owner(atom)
            if owner not in (X.NONE, 0) and owner.id != self._win.id:
                self._owner_changed(disp, name, owner.id, time.monotonic())

    def _handle(self, disp: Any, ev: Any) -> None:
        if (ev.type, getattr(ev, "sub_code", None)) == disp.extension_event.SetSelectionOwnerNotify:
            seen = time.monotonic()
            owner = ev.owner.id if hasattr(ev.owner, "id") else int(ev.owner)
            name = self._names.get(ev.selection)
            if name is None or owner in (X.NONE, self._win.id):
                return
            self._owner_changed(disp, name, owner, seen)
        elif ev.type == X.SelectionRequest:
            self._refuse(disp, ev)
        # SelectionClear: someone took a selection from us; their SetSelectionOwnerNotify follows.

    def _refuse(self, disp: Any, ev: Any) -> None:
        """Answer a paste request with nothing."""
        reply = xevent.SelectionNotify(
            time=ev.time, requestor=ev.requestor, selection=ev.selection, target=ev.target, property=X.NONE
        )
        try:
            ev.requestor.send_event(reply, event_mask=0)
            disp.flush()
        except error.XError:
            pass  # requestor window already gone

    def _owner_changed(self, disp: Any, name: str, owner: int, seen: float) -> None:
        # When the owner does not matter (mode block/allow), act first and look the owner up after:
        # the lookup costs round trips and /proc reads that would delay clearing.
        handling = self._quick(name)
        pid = None
        if handling is None:
            current = disp.get_selection_owner(self._atoms[name])
            if getattr(current, "id", current) != owner:
                return  # stale (deferred during a probe): the newer owner has its own notify
            pid = self._owner_pid(disp, owner)
            handling = self._decide(OwnerChange(name, owner, pid))
        blocked, reason = handling.action == "block", handling.reason
        if handling.action == "text":
            check = self._probe_text(disp, name)
            verdict = judge_text(check, handling.max_bytes)
            blocked, reason = not verdict.ok, verdict.reason
        enforced = False
        if blocked and handling.enforce:
            self._win.set_selection_owner(self._atoms[name], X.CurrentTime)
            # A plain round trip: the server has then processed the take-over and flushed the
            # SelectionClear to the old owner before the (slow, ~3 ms on Xvfb) X-Resource pid query.
            disp.get_input_focus()
            enforced = True
        if blocked or handling.action == "text":
            outcome = SelectionOutcome(
                name, pid, handling, blocked, enforced, reason, time.monotonic() - seen
            )
            if pid is None:
                # Acted first (the owner did not matter); the owner is still connected right after the
                # take-over round trip, so ask for its pid now.
                outcome = dataclasses.replace(outcome, pid=self._owner_pid(disp, owner))
            self._report(outcome)
        for ev in self._deferred[:]:
            self._deferred.remove(ev)
            self._handle(disp, ev)

    def _owner_pid(self, disp: Any, window: int) -> int | None:
        if self._has_res:
            try:
                reply = disp.res_query_client_ids([{"client": window, "mask": res.LocalClientPIDMask}])
                for ident in reply.ids:
                    if ident.spec.mask & res.LocalClientPIDMask and ident.value:
                        return int(ident.value[0])
            except error.XError:
                pass
        try:
            prop = disp.create_resource_object("window", window).get_full_property(
                self._wm_pid, Xatom.CARDINAL
            )
            if prop is not None and len(prop.value):
                return int(prop.value[0])
        except error.XError:
            pass
        return None

    # "text with max_bytes": target names and a size, never the content --------------------------
    def _probe_text(self, disp: Any, name: str) -> TextCheck:
        if self._convert(disp, name, self._targets_atom) is not True:
            time.sleep(0.02)
            if self._convert(disp, name, self._targets_atom) is not True:
                return TextCheck(targets=None, size=None)
        try:
            prop = self._win.get_full_property(self._probe_prop, X.AnyPropertyType, sizehint=_MAX_TARGETS)
        finally:
            self._win.delete_property(self._probe_prop)
        atoms = list(prop.value)[:_MAX_TARGETS] if prop is not None and prop.format == 32 else []
        names = tuple(disp.get_atom_name(a) for a in atoms)
        text_target = next(
            (t for t in ("UTF8_STRING", "STRING", "text/plain;charset=utf-8") if t in names), None
        )
        if text_target is None:
            return TextCheck(targets=names, size=None)
        converted = self._convert(disp, name, disp.intern_atom(text_target))
        if converted is not True:
            # Some owners (xclip) answer one request at a time and can drop one that arrives while
            # they finish the previous; ask once more before failing closed.
            time.sleep(0.02)
            converted = self._convert(disp, name, disp.intern_atom(text_target))
        if converted is not True:
            return TextCheck(targets=names, size=None, note=f"{text_target} conversion {converted}")
        try:
            # Length 0: the server returns type and bytes_after (the size) and no data.
            reply = self._win.get_property(self._probe_prop, X.AnyPropertyType, 0, 0)
            if reply is None:
                return TextCheck(targets=names, size=None, note="no property")
            if reply.property_type == self._incr_atom:
                # INCR: the owner announces a lower bound of the size (a 32-bit number, not content).
                bound = self._win.get_property(self._probe_prop, self._incr_atom, 0, 1)
                lower = int(bound.value[0]) if bound is not None and len(bound.value) else 0
                return TextCheck(targets=names, size=lower, incremental=True)
            return TextCheck(targets=names, size=int(reply.bytes_after))
        finally:
            self._win.delete_property(self._probe_prop)
            disp.flush()

    def _convert(self, disp: Any, name: str, target: int) -> bool | str:
        """ConvertSelection into our probe property and wait (bounded) for the SelectionNotify:
        True, or why not ("refused", "timed out")."""
        self._win.convert_selection(self._atoms[name], target, self._probe_prop, X.CurrentTime)
        disp.flush()
        deadline = time.monotonic() + _PROBE_TIMEOUT_S
        while True:
            while disp.pending_events():
                ev = disp.next_event()
                if (
                    ev.type == X.SelectionNotify
                    and ev.requestor.id == self._win.id
                    and ev.target == target
                    and ev.selection == self._atoms[name]
                ):
                    return True if ev.property != X.NONE else "refused"
                if ev.type == X.SelectionRequest:
                    self._refuse(disp, ev)
                else:
                    self._deferred.append(ev)
            left = deadline - time.monotonic()
            if left <= 0:
                return "timed out"
            select.select([disp.fileno()], [], [], left)


class PrintKeyGrab(_XThread):
    """Grab Print (any modifiers) on the root window: the press goes to us, not to a screenshot tool."""

    thread_name = "printkey-x11"

    def __init__(self, display_name: str | None, pressed: Callable[[int], None], state: ReportState) -> None:
        super().__init__(display_name)
        self._pressed = pressed
        self._state = state

    def _on_state(self, problem: str | None) -> None:
        self._state(problem)

    def _setup(self, disp: Any) -> None:
        from Xlib import XK

        keycode = disp.keysym_to_keycode(XK.string_to_keysym("Print"))
        if not keycode:
            raise X11Unavailable("no keycode for Print on this display")
        root = disp.screen().root
        catcher = error.CatchError(error.BadAccess)
        root.grab_key(keycode, X.AnyModifier, True, X.GrabModeAsync, X.GrabModeAsync, onerror=catcher)
        disp.sync()
        if catcher.get_error():
            raise X11Unavailable("Print is already grabbed by another client")
        self._keycode = keycode

    def _handle(self, disp: Any, ev: Any) -> None:
        if ev.type == X.KeyPress and ev.detail == self._keycode:
            self._pressed(int(ev.state))


class PrintKeyWatch:
    """Audit mode: observe Print presses through the RECORD extension without grabbing (the key still
    reaches whoever listens). Two connections: a data connection blocked in RecordEnableContext in its
    own thread, and a control connection that disables the context to stop it."""

    def __init__(self, display_name: str | None, pressed: Callable[[int], None]) -> None:
        self._display_name = display_name
        self._pressed = pressed
        self._ctrl: Any = None
        self._ctx: Any = None
        self._thread: threading.Thread | None = None
        self.problem: str | None = None

    def start(self) -> None:
        """Raises :class:`X11Unavailable` when the display or RECORD is missing."""
        from Xlib import XK
        from Xlib.ext import record

        self._ctrl = open_display(self._display_name)
        if not self._ctrl.has_extension("RECORD"):
            self._ctrl.close()
            raise X11Unavailable("X server has no RECORD extension")
        self._keycode = self._ctrl.keysym_to_keycode(XK.string_to_keysym("Print"))
        self._ctx = self._ctrl.record_create_context(
            0,
            [record.AllClients],
            [
                {
                    "core_requests": (0, 0),
                    "core_replies": (0, 0),
                    "ext_requests": (0, 0, 0, 0),
                    "ext_replies": (0, 0, 0, 0),
                    "delivered_events": (0, 0),
                    "device_events": (X.KeyPress, X.KeyPress),
                    "errors": (0, 0),
                    "client_started": False,
                    "client_died": False,
                }
            ],
        )
        self._ctrl.sync()
        data = open_display(self._display_name)
        self._thread = threading.Thread(target=self._run, args=(data,), name="printkey-record", daemon=True)
        self._thread.start()

    def _run(self, data: Any) -> None:
        from Xlib.ext import record
        from Xlib.protocol import rq

        def on_reply(reply: Any) -> None:
            if reply.category != record.FromServer or reply.client_swapped or not len(reply.data):
                return
            raw = reply.data
            while len(raw):
                ev, raw = rq.EventField(None).parse_binary_value(raw, data.display, None, None)
                if ev.type == X.KeyPress and ev.detail == self._keycode:
                    self._pressed(int(ev.state))

        try:
            data.record_enable_context(self._ctx, on_reply)  # returns when the context is disabled
        except (error.XError, error.ConnectionClosedError, OSError) as exc:
            self.problem = str(exc) or type(exc).__name__
        finally:
            data.close()

    def stop(self) -> None:
        if self._ctrl is None:
            return
        try:
            self._ctrl.record_disable_context(self._ctx)
            self._ctrl.sync()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._ctrl.record_free_context(self._ctx)
            self._ctrl.close()
        except (error.XError, error.ConnectionClosedError, OSError):
            pass
        self._ctrl = None
