"""Small real X clients for the clipboard tests, run as their own processes (each its own X connection and
pid, as an unprivileged program on the desktop would be):

    python xclient.py own SELECTION TEXT        serve TEXT on SELECTION until killed; prints "owned"
                                                once the server has made it the owner
    python xclient.py paste SELECTION           print what the owner of SELECTION gives as UTF8_STRING;
                                                exit 1 when refused, 2 when no answer within 2 s
    python xclient.py storm SELECTION SECONDS TEXT [own|root|none|paste]
                                                re-take SELECTION as fast as possible for SECONDS, serving
                                                TEXT to every paste; prints "takes N disconnected_after_s T"
                                                (T = -1: never cut off)
    python xclient.py cut-write N TEXT          write TEXT into the root window's CUT_BUFFER<N>
    python xclient.py cut-read N                print CUT_BUFFER<N>'s content; exit 1 when it is absent

Only python-xlib and the standard library: the same tools an unprivileged user has.
"""

from __future__ import annotations

import select
import sys
import time
from typing import Any

from Xlib import X, Xatom, display, error
from Xlib.protocol import event as xevent
from Xlib.protocol import request


def _window(disp: Any) -> Any:
    return disp.screen().root.create_window(0, 0, 1, 1, 0, X.CopyFromParent, X.InputOnly, X.CopyFromParent)


def _serve(disp: Any, ev: Any, text: str) -> None:
    """Answer a paste with ``text`` (SelectionClear and others are ignored: a hostile owner keeps serving
    whoever still asks; the guard decides who gets through)."""
    if ev.type != X.SelectionRequest:
        return
    targets, utf8 = disp.intern_atom("TARGETS"), disp.intern_atom("UTF8_STRING")
    prop = ev.property if ev.property != X.NONE else ev.target
    if ev.target == targets:
        ev.requestor.change_property(prop, Xatom.ATOM, 32, [targets, utf8, Xatom.STRING])
    elif ev.target in (utf8, Xatom.STRING):
        ev.requestor.change_property(prop, ev.target, 8, text.encode())
    else:
        prop = X.NONE
    reply = xevent.SelectionNotify(
        time=ev.time, requestor=ev.requestor, selection=ev.selection, target=ev.target, property=prop
    )
    ev.requestor.send_event(reply, event_mask=0)
    disp.flush()


def own(selection: str, text: str) -> int:
    disp = display.Display()
    win = _window(disp)
    sel = disp.intern_atom(selection)
    win.set_selection_owner(sel, X.CurrentTime)
    disp.sync()
    print("owned", flush=True)  # the server has set it (a guard may have taken it back already)
    while True:
        _serve(disp, disp.next_event(), text)


def paste(selection: str) -> int:
    disp = display.Display()
    win = _window(disp)
    prop = disp.intern_atom("XCLIENT_PASTE")
    utf8 = disp.intern_atom("UTF8_STRING")
    win.convert_selection(disp.intern_atom(selection), utf8, prop, X.CurrentTime)
    disp.flush()
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        while disp.pending_events():
            ev = disp.next_event()
            if ev.type == X.SelectionNotify:
                if ev.property == X.NONE:
                    return 1
                got = win.get_full_property(prop, X.AnyPropertyType)
                sys.stdout.write(bytes(got.value).decode(errors="replace") if got is not None else "")
                return 0
        select.select([disp.fileno()], [], [], 0.05)
    return 2


def storm(selection: str, seconds: float, text: str, owner: str = "own") -> int:
    """``owner``: ``own`` names its own window as the owner, ``root`` the root window (the requests still
    come to this client: the server sends them to whoever set the owner), ``none`` clears the selection,
    ``paste`` asks for the selection instead of taking it."""
    disp = display.Display()
    win = _window(disp)
    sel = disp.intern_atom(selection)
    named = {"own": win.id, "root": disp.screen().root.id}.get(owner, X.NONE)
    prop, utf8 = disp.intern_atom("XCLIENT_PASTE"), disp.intern_atom("UTF8_STRING")
    takes, start, cut = 0, time.monotonic(), -1.0
    try:
        while time.monotonic() - start < seconds:
            for _ in range(50):
                if owner == "paste":
                    win.convert_selection(sel, utf8, prop, X.CurrentTime)
                else:
                    request.SetSelectionOwner(
                        display=disp.display, window=named, selection=sel, time=X.CurrentTime
                    )
            takes += 50
            disp.flush()
            while disp.pending_events():  # raises once the server has cut us off
                _serve(disp, disp.next_event(), text)
    except (error.ConnectionClosedError, OSError):
        cut = time.monotonic() - start
    print(f"takes {takes} disconnected_after_s {cut:.3f}", flush=True)
    return 0


def cut_write(n: int, text: str) -> int:
    disp = display.Display()
    disp.screen().root.change_property(disp.intern_atom(f"CUT_BUFFER{n}"), Xatom.STRING, 8, text.encode())
    disp.sync()
    return 0


def cut_read(n: int) -> int:
    disp = display.Display()
    got = disp.screen().root.get_full_property(disp.intern_atom(f"CUT_BUFFER{n}"), X.AnyPropertyType)
    if got is None:
        return 1
    sys.stdout.write(bytes(got.value).decode(errors="replace"))
    return 0


def main(argv: list[str]) -> int:
    command, *rest = argv
    if command == "own":
        return own(rest[0], rest[1])
    if command == "paste":
        return paste(rest[0])
    if command == "storm":
        return storm(rest[0], float(rest[1]), rest[2], *rest[3:4])
    if command == "cut-write":
        return cut_write(int(rest[0]), rest[1])
    if command == "cut-read":
        return cut_read(int(rest[0]))
    raise SystemExit(f"xclient.py: unknown command {command!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
