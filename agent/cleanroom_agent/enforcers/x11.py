"""X11 backends (python-xlib), each on its own display connection and thread:

* :class:`PrintKeyGrab` — XGrabKey of Print on the root window with AnyModifier; presses are reported.
* :class:`PrintKeyWatch` — audit mode: Print presses seen through RECORD, without grabbing.

The clipboard guard (selections, cut buffers, storms) is in :mod:`x11clipboard`; it shares
:class:`_XThread` (one connection served by one thread, reconnecting with backoff) and the helpers here.
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable
from typing import Any

from Xlib import X, display, error


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


ReportState = Callable[[str | None], None]


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


def stop_record_context(ctrl: Any, ctx: Any, thread: threading.Thread | None) -> None:
    """End a RECORD watcher: disabling the context on the control connection makes the data connection's
    RecordEnableContext return, so its thread ends; then free the context and close. A server already
    gone is no error here."""
    try:
        ctrl.record_disable_context(ctx)
        ctrl.sync()
        if thread is not None:
            thread.join(timeout=5)
        ctrl.record_free_context(ctx)
        ctrl.close()
    except (error.XError, error.ConnectionClosedError, OSError):
        pass


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
        stop_record_context(self._ctrl, self._ctx, self._thread)
        self._ctrl = None
