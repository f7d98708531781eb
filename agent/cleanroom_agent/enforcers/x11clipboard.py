"""X11 clipboard guard (python-xlib): every guarded selection, the root window's cut buffers, storms
contained. One thread (:class:`SelectionGuard`) with two connections to the display:

* the **watch** connection selects ``XFixesSetSelectionOwnerNotify`` for each guarded selection and
  ``PropertyChangeMask`` on the root window (``CUT_BUFFER0``–``7``). It only reads: after setup no request
  on it waits for a reply, so python-xlib never pulls a backlog into the agent (it reads one socket buffer
  at a time) and a flood of events waits in the X server, not in our memory.
* the **act** connection owns the guard's window. It takes selections back, answers every paste
  (``SelectionRequest``) with nothing, asks the server who owns what, deletes cut buffers, probes text
  sizes and disconnects storming clients. Its round trips stay short: what arrives on it is pastes to the
  guard (counted per requestor and contained like owner changes) and ``SelectionClear`` (someone took a
  selection from the guard: at most one per take-over).

Owner changes are coalesced: an event only marks a selection (or cut buffer) as changed; each round the
guard acts once per marked selection on the **newest state, asked from the server**, so ten thousand
re-takes cost one take-over. When the watch falls behind (a round's batch cap reached) every guarded
selection and cut buffer is re-checked from the server each round, so enforcement never waits on the
backlog. Every event is still counted, per X client, for :mod:`clipboardstorm`; a client above the
limit is disconnected from the X server (``KillClient`` on the window it named as owner; the agent is
root and the server lets any client do this) in enforce mode.

Clipboard content is never read: a take-over needs none; for "text with max_bytes" the guard asks for
``TARGETS`` (type names) and has the text converted into a property on its own window, then asks only
for that property's length (GetProperty with length 0 returns ``bytes_after``) and deletes it; a cut
buffer is judged by its type and length and deleted without being read.

The owner's process comes from the X-Resource extension (``XResQueryClientIds``, local client PID mask),
falling back to ``_NET_WM_PID``. Both name the client of the *window* named as owner; a client may name
any window (even the root window or another client's), see docs/enforcement.md.
"""

from __future__ import annotations

import contextlib
import os
import select
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from Xlib import X, Xatom, error
from Xlib.ext import res, xfixes
from Xlib.protocol import event as xevent
from Xlib.protocol import request as xrequest

from .clipboardrules import CUT_BUFFERS, PASTES_PER_CHANGE, GuardRules, Handling, TextCheck, judge_text
from .clipboardstorm import (
    CUT_BUFFER_WRITER,
    UNATTRIBUTED_OWNER,
    FoundStorm,
    Source,
    StormCounter,
    StormKind,
)
from .ratelimit import EventBudget
from .x11 import X11Unavailable, _XThread, open_display, stop_record_context

_PROBE_TIMEOUT_S = 1.0
_MAX_TARGETS = 64
_READS_PER_ROUND = 2  # socket reads per connection per round before acting on the newest state
_FLOODED_PAUSE_S = 0.02  # while an unattributable flood lasts, wait this long between rounds (CPU bound)
_CONFIGURE_TIMEOUT_S = 5.0
_RECV_BUFFER = 64 * 1024  # bytes python-xlib reads at once on the streams that may be flooded
_ATOM_NAMES_CACHED = 256
_MARK = "CLEANROOM_GUARD_MARK"  # property the guard changes on its windows: a point in each event stream
_REJUDGE = "CLEANROOM_GUARD_REJUDGE"


@dataclass(frozen=True)
class OwnerChange:
    selection: str
    window: int
    pid: int | None


@dataclass(frozen=True)
class SelectionOutcome:
    selection: str  # CLIPBOARD, …, or CUT_BUFFER0..7
    channel: Literal["selection", "cut_buffer"]
    pid: int | None
    handling: Handling
    blocked: bool  # the policy forbids this change
    enforced: bool  # and the guard took the selection back (or deleted the cut buffer)
    reason: str
    latency_s: float  # first change seen → taken back (or judged)
    changes: int = 1  # changes coalesced into this one decision
    suppressed_before: int = 0  # outcomes left unreported before this one (event budget)


@dataclass(frozen=True)
class StormOutcome:
    what: StormKind
    client: int | None  # the X client's resource base; None when the events name no client
    window: int | None  # the window it named (owner or requestor)
    pid: int | None
    process: str | None  # its name, read before the disconnect (the process may exit right after)
    selections: tuple[str, ...]
    rate_per_s: float
    limit_per_s: float
    together: bool  # one of many clients above the total, not above the limit alone
    action: Literal["disconnected", "not_disconnected", "reported"]
    detail: str
    latency_s: float  # storm found → client disconnected


@dataclass
class GuardStats:
    """Counters for tests and the bench (read from other threads; plain ints)."""

    rounds: int = 0
    behind_rounds: int = 0  # rounds that found the watch behind and re-checked everything
    watch_events: int = 0
    act_events: int = 0
    max_queue: int = 0  # most events python-xlib held queued on either connection
    takebacks: int = 0
    disconnects: int = 0


DecideOwner = Callable[[OwnerChange], Handling]
ReportOutcome = Callable[[SelectionOutcome], None]
ReportStorm = Callable[[StormOutcome], None]
ReportState = Callable[[str | None], None]
ReportCalm = Callable[[], None]


def _xid(obj: Any) -> int:
    return int(obj.id) if hasattr(obj, "id") else int(obj)


def _input_only_window(root: Any) -> Any:
    """A 1×1 unmapped window whose own property changes come back as events (marks in the stream)."""
    return root.create_window(
        0, 0, 1, 1, 0, X.CopyFromParent, X.InputOnly, X.CopyFromParent, event_mask=X.PropertyChangeMask
    )


def _core_errors(conn: Any) -> Any:
    """python-xlib 0.33's RANDR module registers its error codes 0–2 without adding the extension's first
    error code, so core BadRequest (1) and BadValue (2) then parse as RANDR errors without a sequence
    number and the read loop raises AttributeError (seen with KillClient on a client already gone). Put
    the core classes back."""
    for code in (X.BadRequest, X.BadValue):
        conn.display.error_classes[code] = error.xerror_class[code]
    return conn


def _ignore_x_error(err: Any, request: Any) -> None:
    """Errors of requests whose target may be gone (a requestor window closed, a client killed)."""


@dataclass
class _Pending:
    changes: int
    first_seen: float


class SelectionGuard(_XThread):
    thread_name = "clipboard-x11"

    def __init__(
        self,
        display_name: str | None,
        rules: GuardRules,
        *,
        decide: DecideOwner,
        report: ReportOutcome,
        storm: ReportStorm,
        calm: ReportCalm,
        state: ReportState,
        describe: Callable[[int], str | None] = lambda pid: None,
        budget: EventBudget | None = None,
    ) -> None:
        super().__init__(display_name)
        self._decide = decide
        self._describe = describe
        self._report = report
        self._report_storm = storm
        self._report_calm = calm
        self._state = state
        self._budget = budget or EventBudget()
        self.stats = GuardStats()
        # configure() from other threads; the guard thread takes the newest rules at the top of a round
        self._lock = threading.Condition()
        self._wanted: GuardRules = rules
        self._wanted_gen = 1
        self._applied_gen = 0
        self._connected = False
        # Wakes the guard thread: new rules (configure) or a storm found by the RECORD thread.
        self._nudge_r, self._nudge_w = os.pipe()
        os.set_blocking(self._nudge_w, False)
        # guard thread only, from here on
        self._rules = rules
        self._watch: Any = None
        self._pending: dict[str, _Pending] = {}
        self._cut_pending: dict[int, _Pending] = {}
        self._counter = StormCounter(rules.storm_changes_per_s, PASTES_PER_CHANGE)
        self._recorder: SelectionRecorder | None = None
        self._ctl: Any = None  # used by the guard and the containment thread, under _ctl_lock
        self._ctl_lock = threading.Lock()
        # The RECORD thread never waits for an X reply itself: while it waits, nobody reads the recorded
        # stream, and an X server whose RECORD output to it is full stops answering everyone (seen under a
        # storm: every connection, a new one included, waiting on the server). It wakes this thread instead.
        self._contain_wanted = threading.Event()
        self._container: threading.Thread | None = None
        self._container_stop = False
        self._storming = False  # degraded by a storm until calm
        self._atom_names: dict[int, str] = {}

    # --- any thread ------------------------------------------------------------------------------
    def configure(self, rules: GuardRules, timeout: float = _CONFIGURE_TIMEOUT_S) -> bool:
        """Put ``rules`` in force. True once the guard thread has applied them and re-judged the current
        owners and cut buffers; False when the display is not connected now (the rules are taken at the
        next connection). Raises TimeoutError when a connected guard did not confirm in time."""
        with self._lock:
            self._wanted = rules
            self._wanted_gen += 1
            gen = self._wanted_gen
            if not self._connected:
                return False
        self._nudge()
        with self._lock:
            done = self._lock.wait_for(lambda: self._applied_gen >= gen or not self._connected, timeout)
            if not done:
                raise TimeoutError(f"clipboard guard did not apply the rules within {timeout:g} s")
            return self._applied_gen >= gen

    def stop(self) -> None:
        super().stop()
        os.close(self._nudge_r)
        os.close(self._nudge_w)

    @property
    def recording(self) -> bool:
        """Whether storms are attributed through RECORD (exact) rather than by the windows events name."""
        recorder = self._recorder
        return recorder is not None and recorder.alive

    def _nudge(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):  # full: the guard has wake-ups pending already
            os.write(self._nudge_w, b"n")

    # --- connection lifecycle (guard thread) -----------------------------------------------------
    def _on_state(self, problem: str | None) -> None:
        with self._lock:
            self._connected = problem is None
            self._lock.notify_all()
        self._state(problem)

    def _setup(self, act: Any) -> None:
        try:
            self._setup_guard(act)
        except (X11Unavailable, error.XError, error.ConnectionClosedError, OSError):
            raise
        except Exception as exc:  # see _serve
            raise X11Unavailable(f"clipboard guard failed: {type(exc).__name__}: {exc}"[:300]) from exc

    def _setup_guard(self, act: Any) -> None:
        if not act.has_extension("XFIXES"):
            raise X11Unavailable("X server has no XFIXES extension")
        _core_errors(act).set_error_handler(_ignore_x_error)
        self._has_res = act.has_extension("X-Resource")
        self._id_mask = int(act.display.info.resource_id_mask)
        self._root = act.screen().root
        self._win = _input_only_window(self._root)
        self._win.change_property(act.intern_atom("WM_NAME"), Xatom.STRING, 8, b"cleanroom-clipboard-guard")
        self._targets_atom = act.intern_atom("TARGETS")
        self._incr_atom = act.intern_atom("INCR")
        self._probe_prop = act.intern_atom("CLEANROOM_PROBE")
        self._wm_pid = act.intern_atom("_NET_WM_PID")
        self._mark_atom = act.intern_atom(_MARK)
        self._rejudge_atom = act.intern_atom(_REJUDGE)
        self._cut_atoms = {act.intern_atom(name): n for n, name in enumerate(CUT_BUFFERS)}
        self._guarded: dict[str, int] = {}
        self._names: dict[int, str] = {}
        watch = open_display(self._display_name)
        try:
            _core_errors(watch).set_error_handler(_ignore_x_error)
            if not watch.has_extension("XFIXES"):
                raise X11Unavailable("X server has no XFIXES extension")
            watch.xfixes_query_version()
            self._owner_notify = watch.extension_event.SetSelectionOwnerNotify
            self._watch_root = watch.screen().root
            self._watch_root.change_attributes(event_mask=X.PropertyChangeMask)
            self._watch_win = _input_only_window(self._watch_root)
            watch.sync()
        except BaseException:
            watch.close()
            raise
        self._watch = watch
        try:
            # python-xlib reads up to SO_RCVBUF (often MBs, ~100k events) per read: keep a read small so
            # a flood costs little memory per round (the rest waits in the X server).
            watch.display.recv_buffer_size = act.display.recv_buffer_size = _RECV_BUFFER
            # A connection nothing floods (it selects no events and owns nothing): disconnecting a
            # storming client on it takes one quick round trip even while pastes pile up on `act`,
            # and the RECORD thread can use it at once.
            ctl = open_display(self._display_name)
            _core_errors(ctl).set_error_handler(_ignore_x_error)
            with self._ctl_lock:
                self._ctl = ctl
            self._start_container()
            self._own_clients = frozenset(
                int(conn.display.info.resource_id_base) for conn in (act, watch, ctl)
            )
            self._pending.clear()
            self._cut_pending.clear()
            with self._lock:
                rules, gen = self._wanted, self._wanted_gen
            self._counter = StormCounter(rules.storm_changes_per_s, PASTES_PER_CHANGE)
            self._apply_rules(act, rules)
            watch.sync()  # the selections are watched before their owners are asked for below
            self._recorder = None
            if act.has_extension("RECORD"):
                recorder = SelectionRecorder(self._display_name, self._on_recorded)
                recorder.start()
                self._recorder = recorder
            self._round(act, reconfigured=gen)
        except BaseException:
            self._close_streams()
            raise

    def _start_container(self) -> None:
        self._container_stop = False
        self._contain_wanted.clear()
        self._container = threading.Thread(target=self._contain_loop, name="clipboard-contain", daemon=True)
        self._container.start()

    def _contain_loop(self) -> None:
        while True:
            self._contain_wanted.wait()
            self._contain_wanted.clear()
            if self._container_stop:
                return
            self._contain()

    def _close_streams(self) -> None:
        recorder, self._recorder = self._recorder, None
        if recorder is not None:
            recorder.stop()
        container, self._container = self._container, None
        if container is not None:
            self._container_stop = True
            self._contain_wanted.set()
            container.join(timeout=5)
        with self._ctl_lock:
            ctl, self._ctl = self._ctl, None
        if ctl is not None:
            with contextlib.suppress(error.ConnectionClosedError, OSError):
                ctl.close()
        watch, self._watch = self._watch, None
        if watch is not None:
            with contextlib.suppress(error.ConnectionClosedError, OSError):
                watch.close()

    def _serve(self, act: Any) -> None:
        try:
            self._serve_rounds(act)
        except (X11Unavailable, error.XError, error.ConnectionClosedError, OSError):
            raise
        except Exception as exc:
            # A fault of the guard itself must not end the thread silently with the status still active:
            # reported as a display problem (degraded), and the guard starts over on a new connection.
            raise X11Unavailable(f"clipboard guard failed: {type(exc).__name__}: {exc}"[:300]) from exc
        finally:
            self._close_streams()

    def _serve_rounds(self, act: Any) -> None:
        fds = [self._watch.fileno(), act.fileno(), self._wake_r, self._nudge_r]
        while not self._stopping:
            reconfigured = None
            with self._lock:
                if self._applied_gen < self._wanted_gen:
                    rules, reconfigured = self._wanted, self._wanted_gen
            if reconfigured is not None:
                self._apply_rules(act, rules)
            behind = self._round(act, reconfigured=reconfigured)
            if behind or self._watch.pending_events() or act.pending_events():
                if behind and self._counter.flooded(time.monotonic()):
                    # Nobody can be disconnected for this flood: pace the reading so it costs a bounded
                    # share of a CPU; what matters is re-checked from the server every round anyway.
                    r, _, _ = select.select([self._wake_r, self._nudge_r], [], [], _FLOODED_PAUSE_S)
                    if self._wake_r in r:
                        return
                continue
            r, _, _ = select.select(fds, [], [], self._idle_timeout())
            if self._wake_r in r:
                return
            if self._nudge_r in r:
                os.read(self._nudge_r, 4096)

    # --- one round ---------------------------------------------------------------------------------
    def _round(self, act: Any, *, reconfigured: int | None = None) -> bool:
        """Read what came, contain storms, act on the newest state. True when the watch fell behind."""
        self.stats.rounds += 1
        behind = self._drain(self._watch, self._on_watch_event, watch=True)
        self._drain(act, self._on_act_event, watch=False)
        if behind:
            self.stats.behind_rounds += 1
        if behind or reconfigured is not None:
            self._mark_everything(time.monotonic())
        self._contain()
        self._enforce_selections(act)
        self._enforce_cut_buffers(act)
        act.flush()  # refusals of pastes, deletions
        if reconfigured is not None:
            with self._lock:
                self._applied_gen = max(self._applied_gen, reconfigured)
                self._lock.notify_all()
        self._update_storm_state()
        return behind

    def _drain(self, conn: Any, handle: Callable[[Any], None], *, watch: bool) -> bool:
        """Handle everything queued, reading the socket at most ``_READS_PER_ROUND`` times (each read is
        one buffer of at most ``_RECV_BUFFER`` bytes); True when that cap was reached with the last read
        full, i.e. more is probably waiting in the server."""
        for _ in range(_READS_PER_ROUND):
            queued = conn.pending_events()  # reads the socket once, then counts the queue
            if queued > self.stats.max_queue:
                self.stats.max_queue = queued
            if not queued:
                return False
            for _ in range(queued):
                handle(conn.next_event())
            if watch:
                self.stats.watch_events += queued
            else:
                self.stats.act_events += queued
            if queued < _RECV_BUFFER // 32:
                return False  # the read was not full: nothing more was waiting
        return True

    # --- events -----------------------------------------------------------------------------------
    def _on_watch_event(self, ev: Any) -> None:
        if (ev.type, getattr(ev, "sub_code", None)) == self._owner_notify:
            name = self._names.get(ev.selection)
            owner = _xid(ev.owner)
            if name is None or owner == self._win.id:
                return
            now = time.monotonic()
            if owner == X.NONE:
                self._count_change(UNATTRIBUTED_OWNER, None, name, now)
                return  # nothing to take back from nobody
            pending = self._pending.get(name)
            if pending is None:
                self._pending[name] = _Pending(1, now)
            else:
                pending.changes += 1
            self._count_change(self._client_of(owner), owner, name, now)
        elif ev.type == X.PropertyNotify:
            window = _xid(ev.window)
            if window == self._watch_root.id:
                n = self._cut_atoms.get(ev.atom)
                if n is not None and ev.state == X.PropertyNewValue:
                    now = time.monotonic()
                    pending = self._cut_pending.get(n)
                    if pending is None:
                        self._cut_pending[n] = _Pending(1, now)
                    else:
                        pending.changes += 1
                    # Property events never name the writer (and RECORD is not asked for property
                    # changes: it would hand the agent their content): counted, never disconnected.
                    if self._rules.storm != "ignore":
                        self._counter.change(CUT_BUFFER_WRITER, None, CUT_BUFFERS[n], now)
            elif window == self._watch_win.id:
                if ev.atom == self._mark_atom:
                    self._counter.mark("watch")
                elif ev.atom == self._rejudge_atom:
                    self._mark_everything(time.monotonic())

    def _on_act_event(self, ev: Any) -> None:
        if ev.type == X.SelectionRequest:
            self._refuse(ev)
            if self._rules.storm != "ignore" and not self.recording:
                requestor = _xid(ev.requestor)
                client = self._client_of(requestor)
                if client not in self._own_clients:
                    name = self._names.get(ev.selection)
                    self._counter.paste(client, requestor, name, time.monotonic())
        elif ev.type == X.SelectionClear:
            # Someone took a selection from the guard: act on its newest owner without waiting for the
            # watch (which may be behind).
            name = self._names.get(ev.atom)
            if name is not None and name not in self._pending:
                self._pending[name] = _Pending(1, time.monotonic())
        elif ev.type == X.PropertyNotify and ev.atom == self._mark_atom:
            self._counter.mark("act")

    def _count_change(self, client: int, window: int | None, selection: str, now: float) -> None:
        """Attribution by the window an event names, when RECORD is not there to name the client."""
        if self._rules.storm == "ignore" or self.recording or client in self._own_clients:
            return
        self._counter.change(client, window, selection, now)

    def _on_recorded(self, opcode: int, client: int, window: int, atom: int) -> None:
        """RECORD thread: ``client`` sent SetSelectionOwner (22) or ConvertSelection (24) naming
        ``window`` and the selection ``atom``."""
        if client in self._own_clients:
            if opcode == _CONVERT_SELECTION and atom == self._mark_atom:
                self._counter.mark("record")
            return
        if self._rules.storm == "ignore":
            return
        # Every selection counts, guarded or not: a flood on a private selection would otherwise keep
        # this thread busy (and behind) while a storm on CLIPBOARD waits in the stream.
        name = self._names.get(atom) or f"atom {atom}"
        now = time.monotonic()
        if opcode == _SET_SELECTION_OWNER:
            found = self._counter.change(client, window or None, name, now)
        else:
            found = self._counter.paste(client, window, name, now)
        if found:
            self._contain_wanted.set()  # at once, on its own thread: the guard may be busy reading a flood
            self._nudge()

    def _client_of(self, xid: int) -> int:
        client = xid & ~self._id_mask
        return client if client else UNATTRIBUTED_OWNER  # 0: the server's own windows (the root)

    def _mark_everything(self, now: float) -> None:
        for name in self._guarded:
            self._pending.setdefault(name, _Pending(0, now))
        for n in range(len(CUT_BUFFERS)):
            self._cut_pending.setdefault(n, _Pending(0, now))

    def _refuse(self, ev: Any) -> None:
        """Answer a paste with nothing (sent with the round's next flush)."""
        reply = xevent.SelectionNotify(
            time=ev.time, requestor=ev.requestor, selection=ev.selection, target=ev.target, property=X.NONE
        )
        ev.requestor.send_event(reply, event_mask=0, onerror=_ignore_x_error)

    # --- rules ------------------------------------------------------------------------------------
    def _apply_rules(self, act: Any, rules: GuardRules) -> None:
        old = self._rules if self._guarded else None
        self._rules = rules
        wanted = {name: act.intern_atom(name) for name in rules.selections}
        for name, atom in self._guarded.items():
            if name not in wanted:
                self._watch.xfixes_select_selection_input(self._watch_root, atom, 0)
        for name, atom in wanted.items():
            if name not in self._guarded:
                self._watch.xfixes_select_selection_input(
                    self._watch_root, atom, xfixes.XFixesSetSelectionOwnerNotifyMask
                )
        self._guarded = wanted
        self._names = {atom: name for name, atom in wanted.items()}
        # Owner changes made before the server took the new selections in are caught by the re-check this
        # round and by a second one once the watch's own mark comes back (it follows the selects).
        self._watch_win.change_property(self._rejudge_atom, Xatom.INTEGER, 32, [0])
        self._watch.flush()
        if old is not None and old.storm_changes_per_s != rules.storm_changes_per_s:
            self._counter = StormCounter(rules.storm_changes_per_s, PASTES_PER_CHANGE)

    # --- storms -----------------------------------------------------------------------------------
    def _contain(self) -> None:
        """Disconnect (or report) the storms found so far. Called by the guard thread every round and by
        the containment thread the moment the RECORD thread finds one; the work is done on the clean ``ctl``
        connection."""
        found = self._counter.take_found()
        if not found:
            return
        with self._ctl_lock:
            ctl = self._ctl
            if ctl is None:
                return
            # On failure the display went away: the guard thread notices on its own connections.
            with contextlib.suppress(error.XError, error.ConnectionClosedError, OSError):
                self._contain_on(ctl, found)

    def _contain_on(self, ctl: Any, found_storms: list[FoundStorm]) -> None:
        disconnected: list[int] = []
        for found in found_storms:
            started = time.monotonic()
            client = found.storm.key if found.storm.key >= 0 else None
            # X-Resource answers by client index, so the client's pid is known even when the window it
            # named is the root window or gone.
            pid = self._owner_pid(ctl, client) if client is not None else None
            process = self._describe(pid) if pid is not None else None
            if self._rules.storm == "report":
                action: Literal["disconnected", "not_disconnected", "reported"] = "reported"
                detail = "audit mode: reported, not disconnected"
            elif client is None:
                action, detail = "not_disconnected", "the events name no X client to disconnect"
            else:
                ok, detail = self._disconnect(ctl, client, found.window)
                action = "disconnected" if ok else "not_disconnected"
                if ok:
                    disconnected.append(client)
            if self._rules.storm == "disconnect":
                self._storming = True
            self._report_storm(
                StormOutcome(
                    found.kind,
                    client,
                    found.window,
                    pid,
                    process,
                    (found.selection,) if found.selection else (),
                    round(found.storm.rate_per_s, 1),
                    found.storm.limit_per_s,
                    found.storm.together,
                    action,
                    detail,
                    time.monotonic() - started,
                )
            )
        if disconnected:
            # Their events sent before the disconnect may still be queued: a mark sent now, after the
            # KillClient on the same connection, comes through behind them on each stream that counts.
            recording = self.recording
            sources: tuple[Source, ...] = ("record",) if recording else ("watch", "act")
            self._counter.disconnected(tuple(disconnected), sources)
            if recording:
                ctl.screen().root.convert_selection(self._mark_atom, self._mark_atom, X.NONE, X.CurrentTime)
            else:
                for window in (self._watch_win.id, self._win.id):
                    ctl.create_resource_object("window", window).change_property(
                        self._mark_atom, Xatom.INTEGER, 32, [0]
                    )
            ctl.flush()

    def _disconnect(self, ctl: Any, client: int, window: int | None) -> tuple[bool, str]:
        """KillClient names a resource of the client: the window it named if that is its own, else its
        first resource (the base: Xlib, XCB and python-xlib allocate it first), else one of its top-level
        windows. A client holding no resource at all cannot be disconnected this way."""
        if client in self._own_clients:
            return False, "the guard's own connection"
        candidates = [window] if window is not None and self._client_of(window) == client else []
        candidates.append(client)
        try:
            children = ctl.screen().root.query_tree().children
            candidates += [w.id for w in children if self._client_of(w.id) == client]
        except error.XError:
            pass
        for resource in list(dict.fromkeys(candidates))[:8]:
            catcher = error.CatchError()
            ctl.create_resource_object("window", resource).kill_client(onerror=catcher)
            ctl.sync()
            if catcher.get_error() is None:
                self.stats.disconnects += 1
                return True, f"KillClient on resource {resource:#x}"
        return False, f"X client {client:#x} holds no resource KillClient could name"

    def _update_storm_state(self) -> None:
        if self._storming and self._counter.calm(time.monotonic(), self._rules.storm_calm_s):
            self._storming = False
            self._report_calm()

    def _idle_timeout(self) -> float:
        last = self._counter.last_over()
        if not self._storming or last is None:
            return 5.0
        return max(0.05, min(5.0, last + self._rules.storm_calm_s - time.monotonic() + 0.01))

    # --- selections -------------------------------------------------------------------------------
    def _enforce_selections(self, act: Any) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        fixed = self._rules.owner_independent
        if fixed is not None:
            self._enforce_fixed(act, fixed, pending)
        else:
            for name, change in pending.items():
                self._enforce_by_owner(act, name, change)

    def _enforce_fixed(self, act: Any, handling: Handling, pending: dict[str, _Pending]) -> None:
        """Modes block and allow: the owner does not matter, so act first and identify after. One round
        trip for all: ask each owner, take each back, then sync (the old owners have their
        SelectionClear when it returns)."""
        if handling.action == "allow":
            return  # permitted changes are not events (a user selecting text all day)
        take = handling.enforce
        asks = {}
        for name in pending:
            atom = self._guarded[name]
            asks[name] = xrequest.GetSelectionOwner(display=act.display, selection=atom, defer=True)
            if take:
                self._win.set_selection_owner(atom, X.CurrentTime)
        act.sync()
        now = time.monotonic()
        for name, ask in asks.items():
            ask.reply()  # answered already: the sync above came after it
            owner = _xid(ask.owner)
            if owner in (X.NONE, self._win.id):
                continue  # nothing was taken from anyone
            self.stats.takebacks += take
            change = pending[name]
            suppressed = self._budget.take(now)
            if suppressed is None:
                continue  # over the event budget: no pid lookup either
            self._report(
                SelectionOutcome(
                    name,
                    "selection",
                    self._owner_pid(act, owner),  # still connected right after the take-over
                    handling,
                    blocked=True,
                    enforced=take,
                    reason=handling.reason,
                    latency_s=now - change.first_seen,
                    changes=max(1, change.changes),
                    suppressed_before=suppressed,
                )
            )

    def _enforce_by_owner(self, act: Any, name: str, change: _Pending) -> None:
        atom = self._guarded[name]
        owner = _xid(act.get_selection_owner(atom))
        if owner in (X.NONE, self._win.id):
            return
        pid = self._owner_pid(act, owner)
        handling = self._decide(OwnerChange(name, owner, pid))
        blocked, reason = handling.action == "block", handling.reason
        if handling.action == "text":
            verdict = judge_text(self._probe_text(act, name), handling.max_bytes)
            blocked, reason = not verdict.ok, verdict.reason
        enforced = blocked and handling.enforce
        if enforced:
            self._win.set_selection_owner(atom, X.CurrentTime)
            act.sync()
            self.stats.takebacks += 1
        if not blocked and handling.action == "allow":
            return
        suppressed = self._budget.take()
        if suppressed is None:
            return
        self._report(
            SelectionOutcome(
                name,
                "selection",
                pid,
                handling,
                blocked,
                enforced,
                reason,
                time.monotonic() - change.first_seen,
                max(1, change.changes),
                suppressed,
            )
        )

    def _owner_pid(self, conn: Any, window: int) -> int | None:
        if self._has_res:
            try:
                reply = conn.res_query_client_ids([{"client": window, "mask": res.LocalClientPIDMask}])
                for ident in reply.ids:
                    if ident.spec.mask & res.LocalClientPIDMask and ident.value:
                        return int(ident.value[0])
            except error.XError:
                pass
        try:
            prop = conn.create_resource_object("window", window).get_full_property(
                self._wm_pid, Xatom.CARDINAL
            )
            if prop is not None and len(prop.value):
                return int(prop.value[0])
        except error.XError:
            pass
        return None

    # --- cut buffers ------------------------------------------------------------------------------
    def _enforce_cut_buffers(self, act: Any) -> None:
        if not self._cut_pending:
            return
        pending, self._cut_pending = self._cut_pending, {}
        handling = self._rules.cut_buffers
        if handling.action == "allow":
            return
        atoms = {n: atom for atom, n in self._cut_atoms.items()}
        # Type and length only (GetProperty with length 0): the content is never read.
        asks = {
            n: xrequest.GetProperty(
                display=act.display,
                delete=False,
                window=self._root.id,
                property=atoms[n],
                type=X.AnyPropertyType,
                long_offset=0,
                long_length=0,
                defer=True,
            )
            for n in sorted(pending)
        }
        now = time.monotonic()
        deleted = False
        for n, ask in asks.items():
            ask.reply()
            if ask.property_type == X.NONE or not ask.bytes_after:
                continue  # absent or empty: nothing to carry
            blocked, reason = True, handling.reason
            if handling.action == "text":
                check = TextCheck((self._atom_name(act, ask.property_type),), int(ask.bytes_after))
                verdict = judge_text(check, handling.max_bytes)
                blocked, reason = not verdict.ok, verdict.reason
            if blocked and handling.enforce:
                self._root.delete_property(atoms[n])
                deleted = True
            suppressed = self._budget.take(now) if blocked else None
            if suppressed is None:
                continue
            self._report(
                SelectionOutcome(
                    CUT_BUFFERS[n],
                    "cut_buffer",
                    None,
                    handling,
                    blocked,
                    blocked and handling.enforce,
                    reason,
                    now - pending[n].first_seen,
                    max(1, pending[n].changes),
                    suppressed,
                )
            )
        if deleted:
            act.flush()

    def _atom_name(self, act: Any, atom: int) -> str:
        name = self._atom_names.get(atom)
        if name is None:
            try:
                name = str(act.get_atom_name(atom))
            except error.XError:
                name = f"atom {atom}"
            if len(self._atom_names) >= _ATOM_NAMES_CACHED:
                self._atom_names.clear()
            self._atom_names[atom] = name
        return name

    # --- "text with max_bytes": target names and a size, never the content --------------------------
    def _probe_text(self, act: Any, name: str) -> TextCheck:
        if self._convert(act, name, self._targets_atom) is not True:
            time.sleep(0.02)
            if self._convert(act, name, self._targets_atom) is not True:
                return TextCheck(targets=None, size=None)
        try:
            prop = self._win.get_full_property(self._probe_prop, X.AnyPropertyType, sizehint=_MAX_TARGETS)
        finally:
            self._win.delete_property(self._probe_prop)
        atoms = list(prop.value)[:_MAX_TARGETS] if prop is not None and prop.format == 32 else []
        names = tuple(self._atom_name(act, a) for a in atoms)
        text_target = next(
            (t for t in ("UTF8_STRING", "STRING", "text/plain;charset=utf-8") if t in names), None
        )
        if text_target is None:
            return TextCheck(targets=names, size=None)
        converted = self._convert(act, name, act.intern_atom(text_target))
        if converted is not True:
            # Some owners (xclip) answer one request at a time and can drop one that arrives while
            # they finish the previous; ask once more before failing closed.
            time.sleep(0.02)
            converted = self._convert(act, name, act.intern_atom(text_target))
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
            act.flush()

    def _convert(self, act: Any, name: str, target: int) -> bool | str:
        """ConvertSelection into our probe property and wait (bounded) for the SelectionNotify:
        True, or why not ("refused", "timed out"). Other events on the act connection meanwhile are
        handled as usual (pastes refused, take-overs marked)."""
        atom = self._guarded[name]
        self._win.convert_selection(atom, target, self._probe_prop, X.CurrentTime)
        act.flush()
        deadline = time.monotonic() + _PROBE_TIMEOUT_S
        while True:
            while act.pending_events():
                ev = act.next_event()
                if (
                    ev.type == X.SelectionNotify
                    and _xid(ev.requestor) == self._win.id
                    and ev.target == target
                    and ev.selection == atom
                ):
                    return True if ev.property != X.NONE else "refused"
                self._on_act_event(ev)
            act.flush()
            left = deadline - time.monotonic()
            if left <= 0:
                return "timed out"
            select.select([act.fileno()], [], [], left)


_SET_SELECTION_OWNER = 22
_CONVERT_SELECTION = 24
RecordedRequest = Callable[[int, int, int, int], None]


class SelectionRecorder:
    """Who sent each SetSelectionOwner and ConvertSelection, through the RECORD extension: the server
    names the sending client (its resource base) with each recorded request, which no event does. Only
    those two requests are recorded; they carry window and atom ids, never content. Two connections:
    a data connection blocked in RecordEnableContext in its own thread, and a control connection that
    disables the context to stop it (as PrintKeyWatch in x11.py).

    ``on_request(opcode, client, window, selection)`` runs in the recorder's thread and must be quick."""

    def __init__(self, display_name: str | None, on_request: RecordedRequest) -> None:
        self._display_name = display_name
        self._on_request = on_request
        self._ctrl: Any = None
        self._ctx: Any = None
        self._thread: threading.Thread | None = None
        self.problem: str | None = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Raises :class:`X11Unavailable` when the display or RECORD is missing."""
        from Xlib.ext import record

        self._ctrl = _core_errors(open_display(self._display_name))
        try:
            if not self._ctrl.has_extension("RECORD"):
                raise X11Unavailable("X server has no RECORD extension")
            nothing = {
                "core_replies": (0, 0),
                "ext_requests": (0, 0, 0, 0),
                "ext_replies": (0, 0, 0, 0),
                "delivered_events": (0, 0),
                "device_events": (0, 0),
                "errors": (0, 0),
                "client_started": False,
                "client_died": False,
            }
            self._ctx = self._ctrl.record_create_context(
                0,
                [record.AllClients],
                [
                    {**nothing, "core_requests": (_SET_SELECTION_OWNER, _SET_SELECTION_OWNER)},
                    {**nothing, "core_requests": (_CONVERT_SELECTION, _CONVERT_SELECTION)},
                ],
            )
            self._ctrl.sync()
            data = _core_errors(open_display(self._display_name))
        except BaseException:
            self._ctrl.close()
            self._ctrl = None
            raise
        data.display.recv_buffer_size = _RECV_BUFFER
        self._thread = threading.Thread(target=self._run, args=(data,), name="clipboard-record", daemon=True)
        self._thread.start()

    def _run(self, data: Any) -> None:
        from Xlib.ext import record

        native = "<" if sys.byteorder == "little" else ">"
        swapped = ">" if native == "<" else "<"

        def on_reply(reply: Any) -> None:
            if reply.category != record.FromClient:
                return
            raw = bytes(reply.data)
            order = swapped if reply.client_swapped else native
            offset = 0
            while offset + 4 <= len(raw):
                opcode = raw[offset]
                (length,) = struct.unpack_from(order + "H", raw, offset + 2)
                header = 4
                if length == 0:  # BIG-REQUESTS: the length follows in 32 bits
                    if offset + 8 > len(raw):
                        return
                    (length,) = struct.unpack_from(order + "I", raw, offset + 4)
                    header = 8
                size = length * 4
                if size < header or offset + size > len(raw):
                    return
                if opcode in (_SET_SELECTION_OWNER, _CONVERT_SELECTION) and size >= header + 8:
                    window, selection = struct.unpack_from(order + "II", raw, offset + header)
                    self._on_request(opcode, int(reply.id_base), window, selection)
                offset += size

        try:
            data.record_enable_context(self._ctx, on_reply)  # returns when the context is disabled
        except Exception as exc:
            # The guard falls back to attributing storms by the windows events name (see `alive`).
            self.problem = f"{type(exc).__name__}: {exc}"[:300]
        finally:
            with contextlib.suppress(error.ConnectionClosedError, OSError):
                data.close()

    def stop(self) -> None:
        if self._ctrl is None:
            return
        stop_record_context(self._ctrl, self._ctx, self._thread)
        self._ctrl = None
